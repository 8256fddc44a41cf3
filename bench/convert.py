"""Benchmark `moekit upcycle` (streaming conversion) against `cp -r` of the same bytes and, when installed,
mergekit-moe on the same inputs. Not a test: run it by hand and record the numbers in docs/benchmarks.md.

    python bench/convert.py                       # 1.5B-class Qwen2, three FFN-only specialists
    python bench/convert.py --mergekit-bin /path/to/venv/bin/mergekit-moe
    python bench/convert.py --repeats 3           # every candidate 3 times, interleaved; medians

It writes a synthetic sharded checkpoint of a real model size (random bf16 weights from a real transformers
config), runs every candidate as a subprocess, and reports wall time, throughput relative to `cp -r` of the
output, and peak memory: anonymous (RssAnon, the real heap; memory-mapped file pages are reclaimable and do
not count) and total RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import Qwen2Config

from moekit.io.writer import PlannedTensor, plan_shards, write_index, write_shard


def qwen2_tensors(config: Qwen2Config, ffn_only: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor a Qwen2ForCausalLM checkpoint holds (FFN tensors only if `ffn_only`)."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    out = [] if ffn_only else [("model.embed_tokens.weight", (config.vocab_size, h)), ("model.norm.weight", (h,))]
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        if not ffn_only:
            out += [
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.q_proj.bias", (h,)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.k_proj.bias", (kv,)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.bias", (kv,)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
            ]
        out += [
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    if not ffn_only and not config.tie_word_embeddings:
        out.append(("lm_head.weight", (config.vocab_size, h)))
    return out


def write_checkpoint(path: Path, config: Qwen2Config, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    """A sharded bf16 checkpoint of random weights, streamed with moekit's writer (5 GB shards like the hub)."""
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    def produce(shape):
        return lambda: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    planned = [PlannedTensor(k, s, torch.bfloat16, produce(s)) for k, s in tensors]
    shards = plan_shards(planned, 2 * 1024**3)
    for shard in shards:
        write_shard(path / shard.name, shard)
    write_index(path, shards)
    config.save_pretrained(path)
    return sum(s.nbytes for s in shards)


def full_specialist(path: Path, base: Path, ffn_only: Path, config: Qwen2Config) -> None:
    """A full checkpoint (base non-FFN tensors + the specialist's FFNs), for tools that need full models."""
    from safetensors import safe_open

    readers = [
        safe_open(str(f), "pt") for f in sorted(base.glob("*.safetensors")) + sorted(ffn_only.glob("*.safetensors"))
    ]
    where = {}
    for reader in readers:
        for key in reader.keys():
            where[key] = reader  # the specialist's FFN tensors come last and win
    planned = [
        PlannedTensor(k, s, torch.bfloat16, lambda k=k: where[k].get_tensor(k)) for k, s in qwen2_tensors(config)
    ]
    path.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(planned, 2 * 1024**3)
    for shard in shards:
        write_shard(path / shard.name, shard)
    write_index(path, shards)
    config.save_pretrained(path)


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, peak RssAnon and peak RSS of a subprocess (polled from /proc every 20 ms)."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = {"anon": 0, "rss": 0}

    def poll():
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                peak["anon"] = max(peak["anon"], int(fields["RssAnon"].split()[0]) * 1024)
                peak["rss"] = max(peak["rss"], int(fields["VmRSS"].split()[0]) * 1024)
            except (FileNotFoundError, KeyError, ValueError, ProcessLookupError):
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{err.decode()[-3000:]}")
    peak["rss"] = max(peak["rss"], resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    return {"seconds": seconds, "peak_anon": peak["anon"], "peak_rss": peak["rss"]}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def time_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    return run_measured(["cp", "-r", str(src), str(dst)])["seconds"]


def medians(results: list[dict]) -> list[dict]:
    """One row per (tool, layout): the median of each number over its repeats (`n` counts them)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["tool"], r["layout"]), []).append(r)
    out = []
    for (tool, layout), rows in groups.items():
        row = {"tool": tool, "layout": layout, "n": len(rows)}
        for key in rows[0]:
            if key not in row:
                row[key] = statistics.median(r[key] for r in rows)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/convert"))
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=8960)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--layout", default="interval:4", help="moekit layout for the main run")
    parser.add_argument(
        "--mergekit-bin", default=shutil.which("mergekit-moe"), help="mergekit-moe executable, if installed"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each moekit layout, interleaved (medians)")
    parser.add_argument("--no-full", action="store_true", help="skip the every-layer-MoE moekit run")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    config = Qwen2Config(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    print(f"writing synthetic checkpoints under {work} ...", flush=True)
    base_bytes = write_checkpoint(work / "base", config, qwen2_tensors(config), seed=0)
    names = ["image", "video", "3d"]
    for seed, name in enumerate(names, 1):
        write_checkpoint(work / name, config, qwen2_tensors(config, ffn_only=True), seed=seed)
    moekit = [str(Path(sys.executable).parent / "moekit")]
    experts = [f for n in names for f in ("--expert", f"{n}={work / n}")] + ["--expert", "base"]
    expert_bytes = 4 * 3 * args.hidden * args.intermediate * 2
    results = []

    def record(label: str, layout: str, out: Path, stats: dict) -> None:
        size = dir_bytes(out)
        cp = time_cp(out, work / "cp-copy")
        results.append(
            {
                "tool": label,
                "layout": layout,
                "output_gb": size / 1e9,
                "seconds": stats["seconds"],
                "cp_seconds": cp,
                "vs_cp": cp / stats["seconds"],
                "peak_anon_gb": stats["peak_anon"] / 1e9,
                "peak_rss_gb": stats["peak_rss"] / 1e9,
            }
        )
        print(results[-1], flush=True)

    layouts = list(dict.fromkeys([args.layout] + ([] if args.no_full else ["full"])))
    for layout in [layout for _ in range(args.repeats) for layout in layouts]:
        out = work / f"moekit-{layout.replace(':', '')}"
        stats = run_measured(
            [
                *moekit,
                "upcycle",
                "--base",
                str(work / "base"),
                *experts,
                "--layers",
                layout,
                "--top-k",
                "2",
                "-o",
                str(out),
                "--quiet",
            ]
        )
        record("moekit upcycle", layout, out, stats)
        shutil.rmtree(out)
    if args.mergekit_bin:
        for name in names:
            full_specialist(work / f"{name}-full", work / "base", work / name, config)
        out = work / "moekit-full-from-full"
        full_experts = [f for n in names for f in ("--expert", f"{n}={work / (n + '-full')}")] + ["--expert", "base"]
        # mergekit's Qwen MoE output needs exactly one shared expert: both tools get the base FFN as one.
        stats = run_measured(
            [
                *moekit,
                "upcycle",
                "--base",
                str(work / "base"),
                *full_experts,
                "--layers",
                "full",
                "--top-k",
                "2",
                "--set",
                "shared_expert=true",
                "-o",
                str(out),
                "--quiet",
                "--no-compare",
            ]
        )
        record("moekit upcycle (full specialists, shared expert)", "full", out, stats)
        shutil.rmtree(out)
        mk_config = work / "mergekit.yml"
        mk_config.write_text(
            json.dumps(
                {
                    "base_model": str(work / "base"),
                    "gate_mode": "random",
                    "dtype": "bfloat16",
                    "experts_per_token": 2,
                    "experts": [{"source_model": str(work / f"{n}-full")} for n in names]
                    + [{"source_model": str(work / "base")}],
                    "shared_experts": [{"source_model": str(work / "base")}],
                }
            )
        )
        out = work / "mergekit"
        stats = run_measured([args.mergekit_bin, str(mk_config), str(out)])
        record("mergekit-moe (full specialists, shared expert)", "full", out, stats)
    print()
    print(
        f"input: base {base_bytes / 1e9:.2f} GB + 3 FFN-only specialists; largest MoE layer's experts {expert_bytes / 1e9:.2f} GB"
    )
    print(f"goal: >= 0.6 of cp throughput; peak RssAnon <= {(1.5 * expert_bytes + 1e9) / 1e9:.2f} GB")
    print("| tool | layout | output GB | wall s | cp -r s | throughput vs cp | peak RssAnon GB | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in medians(results) if args.repeats > 1 else results:
        print(
            f"| {r['tool']} | {r['layout']} | {r['output_gb']:.2f} | {r['seconds']:.1f} | {r['cp_seconds']:.1f} | {r['vs_cp']:.2f} | {r['peak_anon_gb']:.2f} | {r['peak_rss_gb']:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": vars(args)
                    | {"workdir": str(work), "json": str(args.json), "mergekit_bin": args.mergekit_bin},
                    "results": results,
                },
                indent=2,
                default=str,
            )
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
