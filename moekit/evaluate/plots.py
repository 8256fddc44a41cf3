"""Bar charts of expert shares (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_shares(
    shares: dict[str, list[float]], experts: list[str], path: Path, title: str, grouped: bool = False
) -> None:
    """Stacked horizontal bars, one per group (`grouped=False`, like PolyV Fig. 5), or bars per expert with one
    colour per group (`grouped=True`, like Fig. 6). Shares are fractions; the axes show percentages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in shares.items() if s]
    colours = plt.get_cmap("tab10").colors
    if grouped:
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(experts), 3.6))
        width = 0.8 / max(1, len(names))
        for g, name in enumerate(names):
            xs = [e + (g - (len(names) - 1) / 2) * width for e in range(len(experts))]
            bars = ax.bar(xs, [100 * v for v in shares[name]], width, label=name, color=colours[g % 10])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(experts)), experts)
        ax.set_xlabel("expert")
        ax.set_ylabel("percentage of routed tokens")
        ax.legend(title="modality", fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(names)))
        for row, name in enumerate(names):
            left = 0.0
            for e, value in enumerate(shares[name]):
                ax.barh(row, 100 * value, left=left, color=colours[e % 10], label=experts[e] if row == 0 else None)
                if value >= 0.06:
                    ax.text(left + 50 * value, row, f"{100 * value:.0f}%", ha="center", va="center", fontsize=8)
                left += 100 * value
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("percentage of routed tokens")
        ax.legend(ncol=len(experts), loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10, pad=22 if not grouped else 6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
