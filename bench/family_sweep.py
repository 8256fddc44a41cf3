"""The coverage sweep of docs/upcycling.md: every model type of transformers' image-text-to-text and causal-LM
mappings, built tiny from its config, upcycled with no override (3 experts, top-2, every layer) and compared with
its dense self on a text probe.

    python bench/family_sweep.py --markdown docs/family_table.md --json bench/out/families.json
"""

from __future__ import annotations

import argparse
import collections
import platform
from pathlib import Path

import torch
import transformers

from moekit.demo.sweep import coverage, markdown, sweep, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--json", type=Path, help="write every outcome here")
    parser.add_argument("types", nargs="*", help="only these model types")
    args = parser.parse_args()
    torch.set_num_threads(1)
    outcomes = sweep(args.types or None)
    done, total = coverage(outcomes)
    counts = collections.Counter(o.outcome for o in outcomes)
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(f"{done}/{total} dense families upcycled ({100 * done / max(total, 1):.1f}%); outcomes {dict(counts)}")
    print(f"sweep time {sum(o.seconds for o in outcomes):.1f} s")
    if args.markdown:
        args.markdown.write_text(markdown(outcomes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(outcomes, args.json)


if __name__ == "__main__":
    main()
