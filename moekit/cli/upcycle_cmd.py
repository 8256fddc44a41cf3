"""`moekit upcycle`: streaming conversion of a dense checkpoint plus specialists into an MoE checkpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import typer

DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


EXPERT_OPTIONS = ("noise_scale", "reinit_ratio", "seed", "lora_scale", "modality")


def parse_expert(text: str) -> dict:
    """`NAME=SOURCE[,key=value...]` or `base` -> an ExpertSpec dict (keys: EXPERT_OPTIONS).

    Options are read from the right: a trailing `,key=value` with a known key is an option, anything before
    belongs to SOURCE, so a path may hold commas (`image=/data/a,b/ckpt,noise_scale=0.01`)."""
    parts = text.split(",")
    options: dict[str, str] = {}
    while len(parts) > 1:
        key, sep, value = parts[-1].partition("=")
        if key.strip() in EXPERT_OPTIONS and sep:
            if not value.strip():
                raise ValueError(f"--expert {text!r}: option {key.strip()!r} needs a value")
            options[key.strip()] = value.strip()
            parts.pop()
        elif re.fullmatch(r"\s*[A-Za-z_]+\s*=[^/]*", parts[-1]):  # key=value with an unknown key: a typo
            raise ValueError(
                f"--expert {text!r}: {parts[-1].strip()!r} is not an option; options are key=value with key one of "
                f"{', '.join(EXPERT_OPTIONS)}"
            )
        else:
            break
    name, _, source = ",".join(parts).partition("=")
    entry: dict = {"name": name.strip(), "source": (source or "base").strip()}
    entry.update(reversed(list(options.items())))
    return entry


def upcycle(
    spec_file: Path = typer.Argument(None, help="UpcycleSpec YAML (optional; flags override it)", exists=False),
    base: str = typer.Option(None, "--base", help="dense base checkpoint directory"),
    expert: list[str] = typer.Option(
        None,
        "--expert",
        help="NAME=SOURCE[,noise_scale=..,reinit_ratio=..,seed=..]; SOURCE is a checkpoint dir, an FFN-only dir, a LoRA adapter dir, or 'base' (it may contain commas: options are read from the right); repeat per expert",
    ),
    layers: str = typer.Option(None, "--layers", help="interval:K[:OFFSET], first_half, last_half, full or 0,4,8"),
    top_k: int = typer.Option(None, "--top-k", help="experts per token"),
    num_experts: int = typer.Option(
        None, "--num-experts", help="only without --expert: that many copies of the base FFN"
    ),
    output: Path = typer.Option(..., "-o", "--output", help="output directory (written atomically)"),
    overrides: list[str] = typer.Option(None, "--set", help="override a spec field: key=value, e.g. router.std=0.01"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output directory"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    dtype: Literal[tuple(DTYPES)] = typer.Option(
        None, "--dtype", help="cast floating tensors (default: keep each source's)"
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="also read .bin/.pt sources (torch.load weights_only=True)"
    ),
    compare: bool = typer.Option(
        True, "--compare/--no-compare", help="compare specialists' non-FFN tensors with the base first"
    ),
    shard_size: float = typer.Option(4.0, "--shard-size", help="maximum output shard size in GB"),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="write NaN/Inf weights instead of stopping at the first tensor with one"
    ),
) -> None:
    """Upcycle a dense checkpoint into an MoE checkpoint, streaming with bounded memory.

    Example: moekit upcycle --base ./Qwen2.5-VL-7B-Instruct --expert image=./ckpt/image --expert video=./ckpt/video
    --expert 3d=./ckpt/3d --expert base --layers interval:4 --top-k 2 -o ./polyv-moe
    """
    import torch
    from rich.console import Console

    from moekit.config import apply_overrides, load_yaml, parse_config
    from moekit.upcycle import UpcycleSpec
    from moekit.upcycle.convert import convert

    data = load_yaml(spec_file) if spec_file else {}
    if isinstance(data, dict) and set(data) == {"upcycle"}:
        data = data["upcycle"]
    for key, value in (("base", base), ("layers", layers), ("top_k", top_k), ("num_experts", num_experts)):
        if value is not None:
            data[key] = value
    if expert:
        data["experts"] = [parse_expert(e) for e in expert]
        data.setdefault("num_experts", len(expert))
        data["num_experts"] = len(expert)
    data = apply_overrides(data, overrides or [])
    spec = parse_config(UpcycleSpec, data, source=str(spec_file) if spec_file else "command line")
    torch_dtype = getattr(torch, DTYPES[dtype]) if dtype else None
    report = convert(
        spec,
        output,
        overwrite=overwrite,
        progress=not quiet,
        dtype=torch_dtype,
        allow_pickle=allow_pickle,
        compare=compare,
        max_shard_bytes=int(shard_size * 1024**3),
        allow_nonfinite=allow_nonfinite,
    )
    console = Console(stderr=True, quiet=quiet)
    for name, groups in report.divergence.items():
        changed = {g: d for g, d in groups.items() if d > 0}
        console.print(
            f"expert {name}: non-FFN tensors "
            + (f"differ from the base in {len(changed)} group(s)" if changed else "identical to the base")
        )
    console.print(
        f"wrote {report.output} ({report.bytes_written / 1e9:.2f} GB, MoE layers {report.moe_layers}) in {report.seconds:.1f} s"
    )
