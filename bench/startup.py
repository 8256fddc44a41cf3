"""Benchmark start-up (issue 15): `moekit --help`, every command's `--help` and `import moekit`, against torch.

Every candidate is a fresh interpreter, timed from spawn to exit. Candidates are interleaved inside every repeat
(the order rotates), so slow phases of a shared machine hit all of them alike; each figure is the median over the
repeats, and each ratio is a ratio of those medians. Goals:

- `moekit --help` and `moekit <command> --help` (sub-commands included) at most 0.5x `python -c "import torch"`;
- `python -c "import moekit"` at most 1.5x `python -c "import torch, transformers"`.

`import moekit; moekit.UpcycleSpec` (the first public name used, which imports the library) is printed too,
without a goal. `--tree DIR` times the moekit found in DIR (e.g. `git archive HEAD moekit | tar -x -C DIR`), to
compare two versions in one run; the children run in a scratch directory so that no `moekit/` beside them wins.

    python bench/startup.py                                  # 7 repeats, every command's help
    python bench/startup.py --repeats 3 --commands "" data   # only `moekit --help` and `moekit data --help`
    python bench/startup.py --tree /tmp/before --tree .      # two versions side by side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELP_GOAL, IMPORT_GOAL = 0.5, 1.5
# The console script's own body (pyproject's `moekit = "moekit.cli.app:main"`), run with the tree's moekit.
CLI = "import sys; from moekit.cli.app import main; sys.argv[0] = 'moekit'; sys.exit(main())"


LIST_COMMANDS = """
import json, typer.main
from moekit.cli.app import app
def walk(command, prefix):
    yield " ".join(prefix)
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from walk(sub, [*prefix, name])
print(json.dumps(list(walk(typer.main.get_command(app), []))))
"""


def command_paths(tree: Path) -> list[str]:
    """Every command and sub-command of the tree's `moekit`, as the words after `moekit` ("" is `moekit`)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = subprocess.run(
            [sys.executable, "-c", LIST_COMMANDS],
            cwd=scratch,
            env=dict(os.environ, PYTHONPATH=str(tree)),
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(out.stdout)


def candidates(commands: list[str] | None, trees: list[Path]) -> dict[str, tuple[list[str], Path | None]]:
    """Label -> (argv, the tree whose moekit it imports; None for the torch baselines)."""
    py = sys.executable
    found = {"import torch": ([py, "-c", "import torch"], None)}
    found["import torch, transformers"] = ([py, "-c", "import torch, transformers"], None)
    for tree in trees:
        tag = f" [{tree}]" if len(trees) > 1 else ""
        found[f"import moekit{tag}"] = ([py, "-c", "import moekit"], tree)
        found[f"moekit.UpcycleSpec{tag}"] = ([py, "-c", "import moekit; moekit.UpcycleSpec"], tree)
        for words in command_paths(tree) if commands is None else commands:
            found[f"moekit {words} --help".replace("  ", " ") + tag] = ([py, "-c", CLI, *words.split(), "--help"], tree)
    return found


def run_once(argv: list[str], tree: Path | None, scratch: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree)) if tree is not None else dict(os.environ)
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=scratch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.decode()[-1000:]}")
    return elapsed


def measure(found: dict[str, tuple[list[str], Path | None]], repeats: int) -> dict[str, float]:
    """Median seconds per label over `repeats` rounds, each round running every label once in a rotated order."""
    labels, times = list(found), {label: [] for label in found}
    with tempfile.TemporaryDirectory() as scratch:
        for label in labels:  # warm the file cache once, untimed
            run_once(*found[label], scratch)
        for r in range(repeats):
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                times[label].append(run_once(*found[label], scratch))
            print(f"repeat {r + 1}/{repeats} done", file=sys.stderr)
    return {label: statistics.median(t) for label, t in times.items()}


def report(medians: dict[str, float]) -> list[dict]:
    """One row per candidate: median, ratio to its baseline, goal and verdict."""
    torch_s, both_s = medians["import torch"], medians["import torch, transformers"]
    rows = []
    for label, seconds in medians.items():
        if "--help" in label:
            base, ratio, goal = "import torch", seconds / torch_s, HELP_GOAL
        elif label.startswith("import moekit"):
            base, ratio, goal = "import torch, transformers", seconds / both_s, IMPORT_GOAL
        elif label.startswith("moekit.UpcycleSpec"):
            base, ratio, goal = "import torch, transformers", seconds / both_s, None
        else:
            base, ratio, goal = None, None, None
        verdict = "" if goal is None else ("meets" if ratio <= goal else "MISSES")
        rows.append({"label": label, "s": seconds, "base": base, "ratio": ratio, "goal": goal, "verdict": verdict})
    return rows


def print_rows(rows: list[dict], trees: list[Path]) -> None:
    width = max(len(r["label"]) for r in rows)
    print(f"{'candidate':<{width}}  median s  ratio  vs                          goal   verdict")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        goal = "" if r["goal"] is None else f"<= {r['goal']}x"
        print(f"{r['label']:<{width}}  {r['s']:8.2f}  {ratio:>5}  {r['base'] or '':<26}  {goal:<6} {r['verdict']}")
    for tree in trees:
        tag = f" [{tree}]" if len(trees) > 1 else ""
        mine = [r for r in rows if r["label"].endswith(tag) and r["goal"] is not None]
        helps = [r for r in mine if "--help" in r["label"]]
        worst = max(helps, key=lambda r: r["ratio"])
        imp = next(r for r in mine if r["label"].startswith("import moekit"))
        print(
            f"verdict{tag}: help (worst of {len(helps)}: {worst['label'].removesuffix(tag)} {worst['ratio']:.2f}x) "
            f"{'meets' if worst['ratio'] <= HELP_GOAL else 'MISSES'} <= {HELP_GOAL}x; import moekit "
            f"{imp['ratio']:.2f}x {'meets' if imp['ratio'] <= IMPORT_GOAL else 'MISSES'} <= {IMPORT_GOAL}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--commands", nargs="*", help='command words to time ("" is `moekit --help`); default: all')
    parser.add_argument("--tree", action="append", type=Path, help="a folder holding the moekit/ to time")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    trees = [t.resolve() for t in args.tree or [ROOT]]
    medians = measure(candidates(args.commands, trees), args.repeats)
    rows = report(medians)
    print(f"{args.repeats} repeats, {sys.executable}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    print_rows(rows, trees)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
