"""GPU memory of one FSDP2 training step in bf16 (issue 15, part of `bench/gpu_checks.sh`).

An upcycled Qwen2.5-VL MoE (bench/memory_rank.py's model, `--layers` decoder layers, hidden `--hidden`) runs one
FSDP2 step training every parameter under `precision: bf16` (fp32 master weights, bf16 compute), on every GPU of
the machine (torchrun, nccl), once loading whole (`distributed.load: whole`) and once by shards (the default).
Per rank it records the peak GPU memory (`torch.cuda.max_memory_allocated`) and the host peak RSS, against the
fp32 model size; `*-saved` write the output too (streamed by default, `gathered-saved` the whole model on rank 0
first) and compare the two checkpoints. With one GPU both loads hold the whole model on it (FSDP2 has one shard), so the figure there
checks what one GPU holds for a step (fp32 weights, gradients, AdamW state, bf16 copies, activations), not the
saving; the host RSS still shows the loading path.

    python bench/gpu_memory.py --json runs/gpu_memory.json          # on a CUDA machine
    python bench/gpu_memory.py --device cpu --layers 2 --hidden 64   # the same code path on CPU (gloo), a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_rank  # noqa: E402  (a sibling script, not a package)

# `-saved`: the output is written too (measured after it), the decoder layers streamed or the model gathered whole
CANDIDATES = {
    "whole": ["stages[0].distributed.load=whole"],
    "sharded": [],
    "sharded-saved": [],
    "gathered-saved": ["stages[0].distributed.gather=whole"],
}


def write_recipe(root: Path, model: Path) -> Path:
    """bench/memory_rank.py's FSDP2 stage, training every parameter in bf16."""
    path = memory_rank.write_recipe(root, model)
    data = yaml.safe_load(path.read_text())
    data["stages"][0].update(trainable=["all"], precision="bf16", data_params={"kinds": ["text"], "num_samples": 8})
    path.write_text(yaml.safe_dump(data))
    return path


def worker(candidate: str, recipe: str, out: str) -> None:
    """One torchrun process: the stage, measured just before it would write its output (the write is skipped),
    or for `-saved` candidates after writing it."""
    import torch

    import moekit.train.stage as stage_module
    from moekit.pipeline import run_plan
    from moekit.recipe import load_plan

    peak: dict[str, int] = {}

    def record() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            peak["gpu"] = torch.cuda.max_memory_allocated()
        peak["rss"] = memory_rank.vm_hwm()

    def measured(planned, *args, **kwargs):
        record()
        return planned.output_dir

    saved = candidate.endswith("-saved")
    if not saved:
        stage_module.write_output = measured
    run_plan(load_plan(recipe, [f"output_dir={out}/{candidate}", *CANDIDATES[candidate]]))
    if saved:
        record()
    rank = int(os.environ.get("RANK", "0"))
    Path(out, f"{candidate}-{rank}.json").write_text(json.dumps(peak))


def launch(candidate: str, root: Path, processes: int) -> list[dict[str, int]]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    args = [__file__, "--worker", candidate, str(root / "model.yaml"), str(root)]
    result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"{candidate} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return [json.loads(Path(root, f"{candidate}-{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--worker", nargs=3, metavar=("CANDIDATE", "RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; --device cpu runs the same code path on CPU processes")
    processes = torch.cuda.device_count() if args.device == "cuda" else 2
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        size = memory_rank.write_model(root / "model", args.layers, args.hidden)
        write_recipe(root, root / "model")
        results = {c: launch(c, root, processes) for c in CANDIDATES}
        same = compare_outputs(*(root / c / "moe" / "model" for c in ("sharded-saved", "gathered-saved")))
    gib = 2**30
    print(f"fp32 model {size / gib:.2f} GiB, {processes} process(es), one bf16 FSDP2 step training every parameter")
    print("| load | rank | peak GPU GiB | GPU / fp32 model | peak host RSS GiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for candidate, ranks in results.items():
        for rank, peak in enumerate(ranks):
            gpu = peak.get("gpu")
            shown = ("-", "-") if gpu is None else (f"{gpu / gib:.2f}", f"{gpu / size:.2f}x")
            print(f"| {candidate} | {rank} | {shown[0]} | {shown[1]} | {peak['rss'] / gib:.2f} |")
    print(f"streamed vs gathered output: {same}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {"model_bytes": size, "processes": processes, "results": results, "outputs": same}
        args.json.write_text(json.dumps(figures, indent=1))


def compare_outputs(streamed: Path, gathered: Path) -> dict[str, object]:
    """The two saved checkpoints: the same names, shapes and dtypes, and how far apart the values are (two
    training runs on a GPU need not agree bit for bit)."""
    import torch
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, torch.Tensor]:
        out = {}
        for file in sorted(directory.glob("model*.safetensors")):
            with safe_open(str(file), framework="pt") as fh:
                out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
        return out

    a, b = tensors(streamed), tensors(gathered)
    layout = sorted(a) == sorted(b) and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    diff = max((float((a[k].float() - b[k].float()).abs().max()) for k in a if k in b and a[k].numel()), default=0)
    files = len(list(streamed.glob("model*.safetensors")))
    return {"tensors": len(a), "same_names_shapes_dtypes": layout, "max_abs_diff": diff, "streamed_files": files}


if __name__ == "__main__":
    main()
