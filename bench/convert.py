"""Benchmark `moekit upcycle` (streaming conversion) against `cp -r` of the same bytes and, when installed,
mergekit-moe on the same inputs. Not a test: run it by hand and record the numbers in docs/benchmarks.md.

    python bench/convert.py                       # 1.5B-class Qwen2, three FFN-only specialists
    python bench/convert.py --repeats 3 --baseline  # also git HEAD's conversion code, interleaved; medians
    python bench/convert.py --repeats 3 --baseline --drop-caches [--cold]  # as root: the same cache state each run
    python bench/convert.py --mergekit-bin /path/to/venv/bin/mergekit-moe

It writes a synthetic sharded checkpoint of a real model size (random bf16 weights from a real transformers
config), runs every candidate as a subprocess, and reports wall time, throughput relative to `cp -r` of the
output, and peak memory: anonymous (RssAnon, the real heap; memory-mapped file pages are reclaimable and do
not count) and total RSS. Every candidate, `cp -r` included, starts from the same page-cache state: nothing
dirty (`sync`) and its inputs just read, so none reads from the disk while another reads from memory; with
`--drop-caches` (root) nothing else is cached either, and with `--cold` too not even the inputs. Two ratios are
printed: to the page cache (the process has exited) and to the disk (the process plus the `sync` after it).
`--baseline` runs the conversion modules of a git revision over a copy of the working tree's package (`git show`,
nothing checked out) and compares its output with this tree's byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
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


CONVERSION_FILES = (
    "moekit/io/reader.py",
    "moekit/io/writer.py",
    "moekit/upcycle/convert.py",
    "moekit/upcycle/checkpoint_sources.py",
)
GOAL = 0.8  # of cp -r's throughput (issue 15)


def run_measured(cmd: list[str], env: dict | None = None, output: Path | None = None) -> dict:
    """Wall time, peak RssAnon and peak RSS of a subprocess (polled from /proc every 20 ms), then the time of the
    `sync` that puts what it wrote on the disk. With `output`, also when the first tensor bytes appeared in its
    staging folder (`.NAME.*` beside it, where moekit writes before the rename): what comes before is start-up
    (imports, planning, the function-preservation probes), what comes after is streaming."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = {"anon": 0, "rss": 0, "first_byte": None}

    def poll():
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            if output is not None and peak["first_byte"] is None and _staged_bytes(output) > FIRST_BYTES:
                peak["first_byte"] = time.perf_counter() - start
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
    subprocess.run(["sync"], check=True)
    return {
        "seconds": seconds,
        "disk_seconds": time.perf_counter() - start,
        "peak_anon": peak["anon"],
        "peak_rss": peak["rss"],
        "first_byte": peak["first_byte"],
    }


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


FIRST_BYTES = 1 << 20  # more than any header: tensor data is being written


def _staged_bytes(output: Path) -> int:
    total = 0
    for folder in output.parent.glob(f".{output.name}.*"):
        for file in folder.glob("*.safetensors"):
            with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
                total += file.stat().st_size
    return total


DROP_CACHES = Path("/proc/sys/vm/drop_caches")
_drop = False  # --drop-caches
_cold = False  # --cold


def warm(*paths: Path) -> None:
    """Read every file under `paths` once, so that the timed run finds them in the page cache. With
    --drop-caches, first drop every clean page of the machine's cache, so that every run starts with the same
    free memory (writing with less free memory costs the kernel reclaim: cp -r of the 3.1 GB base took 2.7-3.0 s
    with every input cached, 0.9-1.1 s with the base alone); with --cold too, read nothing: every run reads its
    inputs from the disk."""
    if _drop:
        subprocess.run(["sync"], check=True)
        DROP_CACHES.write_text("1\n")
    if _cold:
        return
    for path in paths:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            with open(file, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def time_cp(src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    warm(src)
    stats = run_measured(["cp", "-r", str(src), str(dst)])
    shutil.rmtree(dst)
    return stats


def baseline_package(ref: str, into: Path) -> Path:
    """A copy of the working tree's `moekit` package with `CONVERSION_FILES` as they are at git revision `ref`."""
    root = Path(__file__).resolve().parent.parent
    shutil.rmtree(into, ignore_errors=True)
    shutil.copytree(root / "moekit", into / "moekit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in CONVERSION_FILES:
        text = subprocess.run(["git", "show", f"{ref}:{name}"], cwd=root, check=True, capture_output=True).stdout
        (into / name).write_bytes(text)
    return into


def digest(out: Path) -> dict[str, str]:
    """sha256 of every weight file and the index of an output: two outputs compare byte for byte through these
    without both being on the disk at once (a 10 GB output, twice, plus its `cp -r`)."""
    sums = {}
    for path in sorted(out.iterdir()):
        if path.name.endswith((".safetensors", ".index.json")):
            with open(path, "rb") as fh:
                sums[path.name] = hashlib.file_digest(fh, "sha256").hexdigest()
    return sums


def medians(results: list[dict]) -> list[dict]:
    """One row per (tool, layout): the median of each number over its repeats (`n` counts them)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["tool"], r["layout"]), []).append(r)
    out = []
    for (tool, layout), rows in groups.items():
        row = {"tool": tool, "layout": layout, "n": len(rows)}
        for key in rows[0]:
            values = [r[key] for r in rows if r[key] is not None]
            if key not in row:
                row[key] = statistics.median(values) if values else None
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/convert"))
    parser.add_argument("--inputs", type=Path, help="reuse (or write once and keep) the synthetic inputs here")
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
    parser.add_argument(
        "--baseline", nargs="?", const="HEAD", help="also run the conversion code of this git revision (HEAD)"
    )
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="before every timed run drop the page cache (root; it affects the whole machine)",
    )
    parser.add_argument("--cold", action="store_true", help="with --drop-caches: do not read the inputs first")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    global _drop, _cold
    _drop, _cold = args.drop_caches, args.cold
    if _cold and not _drop:
        parser.error("--cold needs --drop-caches")
    if _drop and not os.access(DROP_CACHES, os.W_OK):
        parser.error(f"--drop-caches: {DROP_CACHES} is not writable (needs root)")

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
    work.mkdir(parents=True)
    inputs = args.inputs or work / "inputs"
    names = ["image", "video", "3d"]
    if not (inputs / "base" / "config.json").is_file():
        print(f"writing synthetic checkpoints under {inputs} ...", flush=True)
        write_checkpoint(inputs / "base", config, qwen2_tensors(config), seed=0)
        for seed, name in enumerate(names, 1):
            write_checkpoint(inputs / name, config, qwen2_tensors(config, ffn_only=True), seed=seed)
    base_bytes = dir_bytes(inputs / "base")
    moekit = [str(Path(sys.executable).parent / "moekit")]
    tools = {"moekit upcycle": (moekit, None)}
    if args.baseline:
        package = baseline_package(args.baseline, work / "baseline-package")
        env = dict(os.environ, PYTHONPATH=str(package))
        tools[f"moekit upcycle ({args.baseline})"] = (
            [sys.executable, "-c", "from moekit.cli.app import main; main()"],
            env,
        )
    experts = [f for n in names for f in ("--expert", f"{n}={inputs / n}")] + ["--expert", "base"]
    expert_bytes = 4 * 3 * args.hidden * args.intermediate * 2
    results = []
    identical: dict[str, bool] = {}

    def record(label: str, layout: str, out: Path, stats: dict) -> None:
        size = dir_bytes(out)
        cp = time_cp(out, work / "cp-copy")
        results.append(
            {
                "tool": label,
                "layout": layout,
                "output_gb": size / 1e9,
                "seconds": stats["seconds"],
                "cp_seconds": cp["seconds"],
                "vs_cp": cp["seconds"] / stats["seconds"],
                "disk_seconds": stats["disk_seconds"],
                "cp_disk_seconds": cp["disk_seconds"],
                "vs_cp_disk": cp["disk_seconds"] / stats["disk_seconds"],
                "peak_anon_gb": stats["peak_anon"] / 1e9,
                "peak_rss_gb": stats["peak_rss"] / 1e9,
                # seconds before the first tensor byte, and the streaming part's rate against cp -r's
                "first_byte_s": stats.get("first_byte"),
                "stream_vs_cp": None
                if stats.get("first_byte") is None
                else cp["seconds"] / max(stats["seconds"] - stats["first_byte"], 1e-9),
            }
        )
        print(results[-1], flush=True)

    layouts = list(dict.fromkeys([args.layout] + ([] if args.no_full else ["full"])))
    for repeat in range(args.repeats):
        for layout in layouts:
            order = list(tools) if repeat % 2 == 0 else list(tools)[::-1]  # alternate who goes first
            outs = {}
            for label in order:
                cmd, env = tools[label]
                out = work / f"out-{len(outs)}"
                warm(inputs)
                upcycle = [*cmd, "upcycle", "--base", str(inputs / "base"), *experts, "--layers", layout]
                stats = run_measured([*upcycle, "--top-k", "2", "-o", str(out), "--quiet"], env, output=out)
                record(label, layout, out, stats)
                if layout not in identical and len(tools) == 2:
                    outs[label] = digest(out)
                shutil.rmtree(out)
            if len(outs) == 2:
                identical[layout] = len(set(map(str, outs.values()))) == 1
                print(f"{layout}: outputs byte-identical: {identical[layout]}", flush=True)
    if args.mergekit_bin:
        for name in names:
            full_specialist(work / f"{name}-full", inputs / "base", inputs / name, config)
        out = work / "moekit-full-from-full"
        full_experts = [f for n in names for f in ("--expert", f"{n}={work / (n + '-full')}")] + ["--expert", "base"]
        # mergekit's Qwen MoE output needs exactly one shared expert: both tools get the base FFN as one.
        warm(inputs / "base", *(work / f"{n}-full" for n in names))
        stats = run_measured(
            [
                *moekit,
                "upcycle",
                "--base",
                str(inputs / "base"),
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
                    "base_model": str(inputs / "base"),
                    "gate_mode": "random",
                    "dtype": "bfloat16",
                    "experts_per_token": 2,
                    "experts": [{"source_model": str(work / f"{n}-full")} for n in names]
                    + [{"source_model": str(inputs / "base")}],
                    "shared_experts": [{"source_model": str(inputs / "base")}],
                }
            )
        )
        out = work / "mergekit"
        warm(inputs / "base", *(work / f"{n}-full" for n in names))
        stats = run_measured([args.mergekit_bin, str(mk_config), str(out)])
        record("mergekit-moe (full specialists, shared expert)", "full", out, stats)
    rows = medians(results) if args.repeats > 1 else results
    print()
    print(
        f"input: base {base_bytes / 1e9:.2f} GB + 3 FFN-only specialists; largest MoE layer's experts "
        f"{expert_bytes / 1e9:.2f} GB; {args.repeats} interleaved repeat(s), medians"
    )
    print(
        "| tool | layout | output GB | wall s | cp -r s | vs cp | wall+sync s | cp -r+sync s | vs cp (disk) "
        "| first byte s | streaming vs cp | peak RssAnon GB | peak RSS GB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tool']} | {r['layout']} | {r['output_gb']:.2f} | {r['seconds']:.1f} | {r['cp_seconds']:.1f} | "
            f"{r['vs_cp']:.2f} | {r['disk_seconds']:.1f} | {r['cp_disk_seconds']:.1f} | {r['vs_cp_disk']:.2f} | "
            f"{_fmt(r.get('first_byte_s'), 1)} | {_fmt(r.get('stream_vs_cp'), 2)} | "
            f"{r['peak_anon_gb']:.2f} | {r['peak_rss_gb']:.2f} |"
        )
    print()
    heap_goal = 1.5 * expert_bytes + 1e9  # the largest MoE layer held (with a temporary) + the interpreter's own
    for r in rows:
        if r["tool"] != "moekit upcycle":
            continue
        speed = "met" if r["vs_cp"] >= GOAL else "missed"
        heap = "met" if r["peak_anon_gb"] * 1e9 <= heap_goal else "missed"
        print(
            f"verdict {r['layout']}: throughput {r['vs_cp']:.2f} of cp -r (to the disk {r['vs_cp_disk']:.2f}), goal "
            f">= {GOAL}: {speed}; peak RssAnon {r['peak_anon_gb']:.2f} GB <= {heap_goal / 1e9:.2f} GB: {heap}"
        )
        if r.get("first_byte_s") is not None:
            print(
                f"  where: {r['first_byte_s']:.1f} s of start-up before the first tensor byte, then streaming at "
                f"{r['stream_vs_cp']:.2f} of cp -r's rate"
            )
    for layout, same in identical.items():
        print(f"verdict {layout}: output byte-identical to {args.baseline}'s: {'yes' if same else 'NO'}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": vars(args)
                    | {"workdir": str(work), "json": str(args.json), "mergekit_bin": args.mergekit_bin},
                    "results": results,
                    "identical": identical,
                },
                indent=2,
                default=str,
            )
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
