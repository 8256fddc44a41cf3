"""Benchmark memory per rank (issue 15): peak RSS of each of 2 FSDP2 CPU processes (torchrun, gloo) that load
an upcycled MoE checkpoint and train one step, loading the model whole (`distributed.load: whole`, the path
before this change) or by shards (the default), against the checkpoint's fp32 size.

A third candidate, `bare`, is a process with the same imports, the recipe loaded and the process group up:
its peak RSS is the fixed overhead. Goal: (sharded peak - overhead) <= 0.6 x the fp32 model, on every rank. The
candidates are interleaved in every repeat (the order rotates); each figure is the median over the repeats.

Peak RSS is VmHWM of /proc/self/status, read just before the stage writes its output; the write itself is
skipped (saving gathers the whole state on rank 0, a separate matter from loading).

    flock /tmp/bench.lock python bench/memory_rank.py              # 3 repeats, a ~320 MB fp32 model
    python bench/memory_rank.py --repeats 1 --layers 8             # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

GOAL = 0.6
CANDIDATES = ("whole", "sharded", "bare")


def vm_hwm() -> int:
    """This process's peak resident set (bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def write_model(out: Path, layers: int) -> int:
    """An upcycled Qwen2.5-VL MoE (every layer, 4 experts) in fp32 safetensors; returns its weight bytes."""
    import torch
    import transformers

    import moekit
    from moekit.demo.tiny import tiny_config

    data = tiny_config("qwen2_5_vl").to_dict()
    text = data["text_config"]
    text.update(hidden_size=256, intermediate_size=768, num_hidden_layers=layers)
    text.pop("layer_types", None)
    text["rope_parameters"]["mrope_section"] = [16, 8, 8]  # head dim 64
    data["vision_config"]["out_hidden_size"] = 256
    config = transformers.Qwen2_5_VLConfig(**data)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).float()
    moe = moekit.upcycle(model, moekit.UpcycleSpec(layers="full", num_experts=4, top_k=2))
    moe.save_pretrained(out)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def write_recipe(root: Path, model: Path) -> Path:
    stage = {
        "name": "moe",
        "from": {"path": str(model)},
        "data_source": "tiny",
        "data_params": {"kinds": ["text"], "num_samples": 4},
        "trainable": ["router"],
        "optimizer": {"lr": 1e-3},
        "schedule": {"kind": "constant"},
        "steps": 1,
        "distributed": {"mode": "fsdp2"},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base": str(model), "output_dir": str(root / "runs"), "stages": [stage]}))
    return path


def worker(candidate: str, recipe: str, out: str) -> None:
    """One process of a torchrun launch: run the stage (or only bring the process group up) and write peak RSS."""
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401

    import moekit  # noqa: F401
    import moekit.train.stage as stage_module
    from moekit.pipeline import run_plan
    from moekit.recipe import load_plan
    from moekit.train.engine import process_state

    state = process_state()
    load_plan(recipe, [f"output_dir={out}/{candidate}"])  # the bare process stops here
    peak = {}
    if candidate != "bare":

        def measured(planned, *args, **kwargs):
            peak["rss"] = vm_hwm()
            return planned.output_dir

        stage_module.write_output = measured
        overrides = [f"output_dir={out}/{candidate}"] + (["stages[0].distributed.load=whole"] * (candidate == "whole"))
        run_plan(load_plan(recipe, overrides))
    state.wait_for_everyone()
    rss = peak.get("rss", vm_hwm())
    Path(out, f"{candidate}-{state.process_index}.json").write_text(json.dumps({"rss": rss}))


def launch(candidate: str, recipe: Path, out: Path) -> list[int]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    args = ["--worker", candidate, str(recipe), str(out)]
    result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"{candidate} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return [json.loads(Path(out, f"{candidate}-{r}.json").read_text())["rss"] for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--worker", nargs=3, metavar=("CANDIDATE", "RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        size = write_model(root / "model", args.layers)
        recipe = write_recipe(root, root / "model")
        runs: dict[str, list[list[int]]] = {c: [] for c in CANDIDATES}
        for repeat in range(args.repeats):
            order = CANDIDATES[repeat % 3 :] + CANDIDATES[: repeat % 3]
            for candidate in order:
                runs[candidate].append(launch(candidate, recipe, root))
                print(f"repeat {repeat + 1} {candidate}: {[r / 2**20 for r in runs[candidate][-1]]} MiB", flush=True)
    mib = 2**20
    print(f"\nfp32 model: {size / mib:.1f} MiB; medians over {args.repeats} repeats, per rank")
    medians = {c: [statistics.median(run[r] for run in runs[c]) for r in (0, 1)] for c in CANDIDATES}
    overhead = medians["bare"]
    print("| candidate | rank 0 (MiB) | rank 1 (MiB) | rank 0 - overhead | rank 1 - overhead |")
    print("| --- | --- | --- | --- | --- |")
    for c in CANDIDATES:
        net = [(medians[c][r] - overhead[r]) / size for r in (0, 1)]
        cells = [f"{medians[c][r] / mib:.0f}" for r in (0, 1)] + [f"{n:.2f}x" for n in net]
        print(f"| {c} | " + " | ".join(cells) + " |")
    worst = max((medians["sharded"][r] - overhead[r]) / size for r in (0, 1))
    verdict = "met" if worst <= GOAL else "not met"
    print(f"\nsharded: worst rank {worst:.2f}x the fp32 model above the overhead; goal <= {GOAL}x: {verdict}")
    ratio = max(medians["sharded"][r] / medians["whole"][r] for r in (0, 1))
    print(f"sharded / whole peak RSS (worst rank): {ratio:.2f}")


if __name__ == "__main__":
    main()
