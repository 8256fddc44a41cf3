"""Benchmark memory per rank (issue 15): peak RSS of each of 2 CPU processes (torchrun, gloo) that load an
upcycled MoE checkpoint and train one step under FSDP2 or DeepSpeed ZeRO-3, the model loaded whole
(`distributed.load: whole`, the path before this change) or by shards (the default), against its fp32 size.

Candidates (`CANDIDATES`): `bare` is a process with the same imports, the recipe loaded and the process group
up. `*-2l` run the same sharded step on the same architecture cut to 2 decoder layers: the fixed overhead of
that step (the process, one gathered layer, activations of this batch). `fsdp2-*-unbounded` run with moekit's
`bound_host_heap` switched off (glibc's dynamic mmap threshold, the behaviour before it); `fsdp2-*-env` with
`MALLOC_MMAP_THRESHOLD_=131072` set at launch instead; `zero3-sharded-p0` with DeepSpeed's
`stage3_param_persistence_threshold: 0` (every tensor partitioned). Goal: (sharded peak - 2-layer peak) / (fp32 size -
2-layer fp32 size) <= 0.6 on every rank, i.e. the memory that grows with the model. The candidates are
interleaved in every repeat (the order rotates); each figure is the median over the repeats.

Peak RSS is VmHWM of /proc/self/status, read just before the stage writes its output, the write skipped; the
`-saved` candidates write it and read VmHWM after: `*-sharded-saved` streams the decoder layers (the default),
`*-sharded-gathered-saved` gathers the whole state on rank 0 first (`distributed.gather: whole`), both against
`*-2l-saved`.

    flock /tmp/bench.lock python bench/memory_rank.py              # 3 repeats, a ~320 MB fp32 model
    python bench/memory_rank.py --repeats 1 --only fsdp2           # quick look
    python bench/memory_rank.py --processes 4 --candidates fsdp2-2l,fsdp2-whole,fsdp2-sharded   # 4 ranks
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

GOAL = 0.6
WHOLE = "stages[0].distributed.load=whole"
GATHERED = "stages[0].distributed.gather=whole"
BF16 = "stages[0].precision=bf16"
ZERO3 = ["stages[0].distributed.mode=deepspeed", "stages[0].distributed.zero_stage=3"]
# name -> (model, recipe overrides, launch environment, bound_host_heap on)
CANDIDATES: dict[str, tuple[str, list[str], dict[str, str], bool]] = {
    "bare": ("model", [], {}, True),
    "fsdp2-2l": ("model2", [], {}, True),
    "fsdp2-whole": ("model", [WHOLE], {}, True),
    "fsdp2-sharded": ("model", [], {}, True),
    "fsdp2-whole-unbounded": ("model", [WHOLE], {}, False),
    "fsdp2-sharded-unbounded": ("model", [], {}, False),
    "fsdp2-whole-env": ("model", [WHOLE], {"MALLOC_MMAP_THRESHOLD_": "131072"}, True),
    "fsdp2-sharded-env": ("model", [], {"MALLOC_MMAP_THRESHOLD_": "131072"}, True),
    "zero3-2l": ("model2", ZERO3, {}, True),
    "zero3-whole": ("model", [*ZERO3, WHOLE], {}, True),
    "zero3-sharded": ("model", ZERO3, {}, True),
    # DeepSpeed keeps tensors under 100k elements whole on every process (here the attention projections)
    "zero3-sharded-p0": ("model", [*ZERO3, "stages[0].distributed.deepspeed_config={root}/p0.json"], {}, True),
    # `-saved`: the output is written too, the decoder layers streamed (the default) or the model gathered first
    "fsdp2-2l-saved": ("model2", [], {}, True),
    "fsdp2-sharded-saved": ("model", [], {}, True),
    "fsdp2-sharded-gathered-saved": ("model", [GATHERED], {}, True),
    # precision bf16 with a bf16-stored checkpoint (as released models are): frozen shards in bf16 (the default)
    # or in fp32 (`distributed.frozen_weights: fp32`, the path before)
    "fsdp2-2l-bf16": ("model2-bf16", [BF16], {}, True),
    "fsdp2-sharded-bf16": ("model-bf16", [BF16], {}, True),
    "fsdp2-sharded-bf16-fp32frozen": ("model-bf16", [BF16, "stages[0].distributed.frozen_weights=fp32"], {}, True),
    "zero3-2l-saved": ("model2", ZERO3, {}, True),
    "zero3-sharded-saved": ("model", ZERO3, {}, True),
    "zero3-sharded-gathered-saved": ("model", [*ZERO3, GATHERED], {}, True),
}


def vm_hwm() -> int:
    """This process's peak resident set (bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def qwen_config(layers: int, hidden: int = 256):
    """The tiny Qwen2.5-VL's config widened to `hidden` (head dim 64) with `layers` decoder layers."""
    import transformers

    from moekit.demo.tiny import tiny_config

    data = tiny_config("qwen2_5_vl").to_dict()
    text = data["text_config"]
    heads = hidden // 64
    text.update(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=heads)
    text["num_key_value_heads"] = min(text["num_key_value_heads"], heads)  # GQA needs kv heads <= heads
    text.pop("layer_types", None)
    text["rope_parameters"]["mrope_section"] = [16, 8, 8]  # head dim 64
    data["vision_config"]["out_hidden_size"] = hidden
    return transformers.Qwen2_5_VLConfig(**data)


def write_model(out: Path, layers: int, hidden: int = 256, dtype: str = "float32") -> int:
    """An upcycled Qwen2.5-VL MoE (every layer, 4 experts, head dim 64) in `dtype` safetensors; returns its weight
    bytes."""
    import torch
    import transformers

    import moekit

    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(qwen_config(layers, hidden)).float()
    moe = moekit.upcycle(model, moekit.UpcycleSpec(layers="full", num_experts=4, top_k=2))
    moe.to(getattr(torch, dtype)).save_pretrained(out)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def write_recipe(root: Path, model: Path) -> Path:
    """One stage of one step training the routers under FSDP2 on text (every process runs the same modules)."""
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
    path = root / f"{model.name}.yaml"
    path.write_text(yaml.safe_dump({"base": str(model), "output_dir": str(root / "runs"), "stages": [stage]}))
    return path


def worker(candidate: str, recipe: str, out: str) -> None:
    """One process of a torchrun launch: run the stage (or only bring the process group up) and write peak RSS."""
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401

    import moekit  # noqa: F401
    import moekit.train.engine as engine_module
    import moekit.train.stage as stage_module
    from moekit.pipeline import run_plan
    from moekit.recipe import load_plan

    _, overrides, _, bounded = CANDIDATES[candidate]
    if not bounded:
        stage_module.bound_host_heap = engine_module.bound_host_heap = lambda mode: False
    state = engine_module.process_state()
    load_plan(recipe, [f"output_dir={out}/{candidate}"])  # the bare process stops here
    peak = {}
    if candidate != "bare":

        def measured(planned, *args, **kwargs):
            peak["rss"] = vm_hwm()
            return planned.output_dir

        if not candidate.endswith("-saved"):
            stage_module.write_output = measured
        overrides = [o.format(root=out) for o in overrides]
        run_plan(load_plan(recipe, [f"output_dir={out}/{candidate}", *overrides]))
    state.wait_for_everyone()
    rss = peak.get("rss", vm_hwm())
    Path(out, f"{candidate}-{state.process_index}.json").write_text(json.dumps({"rss": rss}))


def launch(candidate: str, root: Path, processes: int = 2) -> list[int]:
    model, _, extra_env, _ = CANDIDATES[candidate]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.update(extra_env)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    args = ["--worker", candidate, str(root / f"{model}.yaml"), str(root)]
    result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=1800)
    files = [Path(root, f"{candidate}-{r}.json") for r in range(processes)]
    if result.returncode and all(f.exists() for f in files):  # measured, then failed on the way out
        print(f"{candidate}: exit {result.returncode} after writing its figures: {result.stderr[-300:]!r}")
    elif result.returncode:
        raise SystemExit(f"{candidate} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    rss = [json.loads(f.read_text())["rss"] for f in files]
    for f in files:
        f.unlink()
    shutil.rmtree(root / candidate, ignore_errors=True)  # the next repeat writes its output again
    return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--only", help="run the candidates whose name contains this (bare always runs)")
    parser.add_argument("--candidates", help="comma-separated names to run instead (bare always runs)")
    parser.add_argument("--processes", type=int, default=2, help="processes per launch (the goal is for 2)")
    parser.add_argument("--worker", nargs=3, metavar=("CANDIDATE", "RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    chosen = None if args.candidates is None else set(args.candidates.split(","))
    unknown = sorted((chosen or set()) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown candidates {unknown}; choose from {sorted(CANDIDATES)}")
    names = [
        c
        for c in CANDIDATES
        if c == "bare" or (c in chosen if chosen is not None else args.only is None or args.only in c)
    ]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        size, small = write_model(root / "model", args.layers), write_model(root / "model2", 2)
        write_recipe(root, root / "model"), write_recipe(root, root / "model2")
        if any(c.endswith(("-bf16", "-fp32frozen")) for c in names):
            write_model(root / "model-bf16", args.layers, dtype="bfloat16")
            write_model(root / "model2-bf16", 2, dtype="bfloat16")
            write_recipe(root, root / "model-bf16"), write_recipe(root, root / "model2-bf16")
        (root / "p0.json").write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        runs: dict[str, list[list[int]]] = {c: [] for c in names}
        for repeat in range(args.repeats):
            shift = repeat % len(names)
            for candidate in names[shift:] + names[:shift]:
                runs[candidate].append(launch(candidate, root, args.processes))
                print(f"repeat {repeat + 1} {candidate}: {[r / 2**20 for r in runs[candidate][-1]]} MiB", flush=True)
    report(runs, size, small, args.repeats)


def report(runs: dict[str, list[list[int]]], size: int, small: int, repeats: int) -> None:
    mib = 2**20
    print(f"\nfp32 model: {size / mib:.1f} MiB (2 layers: {small / mib:.1f} MiB); medians over {repeats} repeats")
    ranks = range(len(next(iter(runs.values()))[0]))
    medians = {c: [statistics.median(run[r] for run in runs[c]) for r in ranks] for c in runs}
    bare = medians["bare"]
    columns = " | ".join(f"rank {r} (MiB)" for r in ranks)
    print(f"| candidate | {columns} | above bare, worst rank | above the 2-layer step, worst rank |")
    print("| --- |" + " --- |" * len(ranks) + " --- | --- |")
    for c, peak in medians.items():
        kind = next((k for k in ("-saved", "-bf16") if k in c), "")
        base = medians.get(c.split("-")[0] + "-2l" + kind)
        above_bare = max((peak[r] - bare[r]) / size for r in ranks)
        grown = (
            ""
            if base is None or c.endswith("2l")
            else f"{max((peak[r] - base[r]) for r in ranks) / (size - small):.2f}x"
        )
        values = " | ".join(f"{peak[r] / mib:.0f}" for r in ranks)
        print(f"| {c} | {values} | {above_bare:.2f}x | {grown} |")
    for engine in ("fsdp2", "zero3"):
        saved = (f"{engine}-sharded-saved", f"{engine}-sharded-gathered-saved", f"{engine}-2l-saved")
        if not all(c in medians for c in saved):
            continue
        (streamed, gathered, base) = (medians[c] for c in saved)
        worst = max((streamed[r] - base[r]) / (size - small) for r in ranks)
        print(
            f"{engine} with the write: streamed {worst:.2f}x above the 2-layer step (goal <= {GOAL}x: "
            f"{'met' if worst <= GOAL else 'not met'}); rank 0 streamed / gathered {streamed[0] / gathered[0]:.2f}"
        )
    for engine in ("fsdp2", "zero3"):
        if any(f"{engine}-{k}" not in medians for k in ("sharded", "whole", "2l")):
            continue
        peak, base = medians[f"{engine}-sharded"], medians[f"{engine}-2l"]
        worst = max((peak[r] - base[r]) / (size - small) for r in ranks)
        verdict = "met" if worst <= GOAL else "not met"
        ratio = max(peak[r] / medians[f"{engine}-whole"][r] for r in ranks)
        print(
            f"{engine} sharded: {worst:.2f}x above the 2-layer step (goal <= {GOAL}x: {verdict}); sharded / whole {ratio:.2f}"
        )


if __name__ == "__main__":
    main()
