"""lmms-eval against `moekit eval`, on an MMStar fixture in the released layout (tests/bench_fixtures.py).

1. `lmms-eval --model moekit` (plugins/moekit-lmms) runs the `moekit_mmstar` task (lmms-eval's own MMStar
   functions reading the local parquet, with moekit's prompt) on a tiny VLM: its predictions must equal
   `moekit eval mmstar`'s, token for token (both generate through moekit.evaluate.generate).
2. The same predictions, plus hand-written replies in the forms models give, are scored by lmms-eval's MMStar
   scorer and by moekit's (the MMStar authors' rule): the replies where the two rules disagree are listed.

    python bench/lmms_check.py                 # makes bench/out/lmms/venv on first use (~2 min)

lmms-eval lives in its own venv (it pulls its own datasets / pandas; torch is held at the CPU wheel by a
constraints file and its CUDA torchvision removed). Results: stdout and `--json`; docs/evaluation.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPLIES = ["A", "B", "(C)", "The answer is D", "option b", "B. green", "blue", "white", "I think it is C", "Answer: D"]


def venv(work: Path) -> Path:
    python = work / "venv" / "bin" / "python"
    if (work / "venv" / ".ready").is_file():
        return python
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
    (work / "constraints.txt").write_text("torch==2.13.0+cpu\ntransformers==5.23.0\n")
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run(
        [
            *pip,
            "-c",
            str(work / "constraints.txt"),
            "lmms-eval==0.7.3",
            "filelock<4",
            "-e",
            str(ROOT),
            "-e",
            str(ROOT / "plugins" / "moekit-lmms"),
        ],
        check=True,
    )
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision"], check=True)
    (work / "venv" / ".ready").write_text("")
    return python


LMMS_SCORER = """
import json, sys
import pandas as pd
from lmms_eval.tasks.mmstar.utils import mmstar_process_results
docs = pd.read_parquet(sys.argv[1]).drop(columns=["image"]).to_dict("records")
pairs = json.loads(sys.argv[2])
out = []
for index, reply in pairs:
    doc = next(d for d in docs if d["index"] == index)
    out.append(mmstar_process_results(doc, [reply])["average"]["score"])
print(json.dumps(out))
"""


def check(work: Path) -> dict:
    from moekit.demo.bundle import write_tiny_vlm
    from moekit.evaluate.benchmarks import get_benchmark
    from moekit.evaluate.run import run_eval
    from tests import bench_fixtures as fx

    python = venv(work)
    bundle = work / "bundle"
    if not (bundle / "config.json").is_file():
        write_tiny_vlm(bundle)
    data = fx.mmstar(work / "MMStar")
    ours = run_eval("mmstar", bundle, data.parent, work / "moekit-eval", overwrite=True, progress=False)
    records = [json.loads(line) for line in (work / "moekit-eval" / "predictions.jsonl").read_text().splitlines()]
    tasks = work / "tasks"
    subprocess.run([str(python), "-m", "moekit_lmms", "mmstar", str(data), str(tasks)], check=True)
    runs = work / "lmms-runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf")}
    done = subprocess.run(
        [
            str(python.parent / "lmms-eval"),
            "--model",
            "moekit",
            "--model_args",
            f"pretrained={bundle}",
            "--tasks",
            "moekit_mmstar",
            "--include_path",
            str(tasks),
            "--log_samples",
            "--output_path",
            str(runs),
            "--verbosity",
            "DEBUG",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    (work / "lmms-eval.log").write_text(done.stdout + done.stderr)
    samples = sorted(runs.rglob("*_samples_moekit_mmstar.jsonl"), key=lambda p: p.stat().st_mtime)
    if done.returncode or not samples:
        raise SystemExit(f"lmms-eval failed (rc {done.returncode}); see {work / 'lmms-eval.log'}")
    theirs = [json.loads(line) for line in samples[-1].read_text().splitlines()]
    by_doc = {s["doc_id"]: s for s in theirs}
    same = [r["prediction"].split("\n\n")[0] == by_doc[int(r["id"])]["filtered_resps"] for r in records]
    questions = get_benchmark("mmstar").load(data.parent, None, None)
    pairs = [(int(q.id), reply) for q in questions for reply in REPLIES]
    pairs += [(int(r["id"]), by_doc[int(r["id"])]["filtered_resps"]) for r in records]
    scored = subprocess.run(
        [str(python), "-c", LMMS_SCORER, str(data), json.dumps(pairs)], capture_output=True, text=True, check=True
    )
    lmms_scores = json.loads(scored.stdout.strip().splitlines()[-1])
    by_id = {int(q.id): q for q in questions}
    mine = [get_benchmark("mmstar").score(by_id[i], reply).score for i, reply in pairs]
    differ = sorted({reply for (i, reply), a, b in zip(pairs, mine, lmms_scores) if a != b})
    return {
        "questions": len(records),
        "same_predictions": sum(same),
        "moekit_overall": ours["overall"],
        "moekit_macro_l2": ours["macro_l2_category"],
        "lmms_average": json.loads(sorted(runs.rglob("*_results.json"))[-1].read_text())["results"]["moekit_mmstar"][
            "average,none"
        ],
        "scored": len(pairs),
        "scored_the_same": sum(a == b for a, b in zip(mine, lmms_scores)),
        "replies_scored_differently": differ,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "lmms")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = check(args.work)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
