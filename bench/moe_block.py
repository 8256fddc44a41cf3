"""Benchmark moekit's MoE block against a dense FFN of the same FLOPs and transformers' stock sparse block.

Measures forward (no grad) and forward+backward of, on identical weights and identical routing:

- `dense k*T`: the stock dense SwiGLU FFN (`Qwen3VLMoeTextMLP`) on k*T tokens: the same FLOPs as the MoE block on
  T tokens without any routing, i.e. the practical speed limit. Every ratio is relative to it.
- `moekit <impl>`: `moekit.moe.MoeBlock` built with `MoeContext(settings=ExpertsSettings(impl))`.
- `stock <impl>`: transformers' `Qwen3VLMoeTextSparseMoeBlock`, selected with `config._experts_implementation`.

`batched_mm` gathers one copy of the expert weights per (token, expert) slot, so it is skipped above
`--batched-mm-max-tokens` (the note printed with the table says how much memory it would have needed).

Candidates are interleaved inside every repeat (the order rotates), so slow phases of a shared machine hit all of
them alike; a ratio is the median over repeats of `t_dense / t_candidate` measured in the same repeat. The fault
columns count the process's minor page faults per call (median): memory the allocator had handed back to the kernel
and takes again, zeroed, 4 KB at a time. The verdict
lines check moekit's default against the goals of issue 15: >= 0.95 of dense k*T at T >= 2048, >= 0.9 at
T >= 512, and not below the best stock implementation (within a tie margin), forward and forward+backward.

    python bench/moe_block.py                # fp32 and bf16, H=1024, I=2816, 4 experts, top-2, T=512,2048,4096
    python bench/moe_block.py --tokens 2048 --dtype bf16 --repeats 7 --json runs/moe_block.json
    python bench/moe_block.py --summarize runs/moe_block*.json      # spread of the ratios over several runs
    python bench/moe_block.py --profile --tokens 512 2048 --impls eager   # where moekit's time goes (profiler)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextMLP, Qwen3VLMoeTextSparseMoeBlock

from moekit.moe import ExpertsSettings, MoeBlock, MoeContext
from moekit.moe.experts import default_implementation

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("eager", "grouped_mm", "batched_mm")


@dataclass
class Candidate:
    name: str
    module: nn.Module
    tokens_factor: int = 1  # the dense reference runs on k*T tokens
    impl: str | None = None


@dataclass
class Result:
    tokens: int
    name: str
    dtype: str = "fp32"
    fwd_ms: list[float] = field(default_factory=list)
    fwdbwd_ms: list[float] = field(default_factory=list)
    fwd_ratio: float = float("nan")  # median over repeats of t_dense / t_candidate in the same repeat
    fwdbwd_ratio: float = float("nan")
    fwd_best: float = float("nan")  # min(t_dense) / min(t_candidate): the least disturbed samples
    fwdbwd_best: float = float("nan")
    fwd_faults: list[int] = field(default_factory=list)  # minor page faults of the process during each call
    fwdbwd_faults: list[int] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 4096], help="tokens T per forward")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"], help="measured in turn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per candidate and T")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="experts implementations")
    p.add_argument("--batched-mm-max-tokens", type=int, default=32, help="skip batched_mm above this T")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write all timings and ratios here")
    p.add_argument("--summarize", type=Path, nargs="+", help="only print the spread of ratios over these --json files")
    p.add_argument("--profile", action="store_true", help="only profile moekit's default block and dense k*T")
    p.add_argument("--gemm-ceiling", action="store_true", help="only time the matmuls: dense k*T's vs the experts'")
    p.add_argument(
        "--call-cost",
        action="store_true",
        help="only fit t(M) = fixed + per-row of one projection's matmul and print the ratio it allows per T",
    )
    p.add_argument("--tie", type=float, default=0.03, help="ratio margin within which moekit ties the best stock")
    return p.parse_args(argv)


def build_candidates(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> list[Candidate]:
    """Dense reference, moekit and stock blocks sharing one set of router and expert weights."""
    H, I, E, k = args.hidden, args.intermediate, args.experts, args.top_k
    torch.manual_seed(args.seed)
    router = torch.randn(E, H) * H**-0.5  # logits of order 1: a realistic, uneven but not collapsed routing
    gate_up = torch.randn(E, 2 * I, H) * H**-0.5
    down = torch.randn(E, H, I) * I**-0.5
    shape = dict(hidden_size=H, intermediate_size=I, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    dense = Qwen3VLMoeTextMLP(Qwen3VLMoeTextConfig(**shape), intermediate_size=I)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(gate_up[0, :I])
        dense.up_proj.weight.copy_(gate_up[0, I:])
        dense.down_proj.weight.copy_(down[0])
    candidates = [Candidate("dense k*T", dense, tokens_factor=k)]
    for impl in args.impls:
        block = MoeBlock(
            MoeContext(settings=ExpertsSettings(impl)),
            hidden_size=H,
            intermediate_size=I,
            num_experts=E,
            top_k=k,
            act=nn.SiLU(),
            gated=True,
            biased=False,
        )
        _load(block, router, gate_up, down)
        default = " (default)" if impl == default_implementation(device) else ""
        candidates.append(Candidate(f"moekit {impl}{default}", block, impl=impl))
    for impl in args.impls:
        stock_config = Qwen3VLMoeTextConfig(**shape)
        stock_config._experts_implementation = impl
        block = Qwen3VLMoeTextSparseMoeBlock(stock_config)
        _load(block, router, gate_up, down)
        candidates.append(Candidate(f"stock {impl}", block, impl=impl))
    for c in candidates:
        c.module.to(device=device, dtype=dtype)
    return candidates


def _load(block: nn.Module, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.copy_(gate_up)
        block.experts.down_proj.copy_(down)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minor_faults() -> int:
    """Minor page faults of this process so far: each is a fresh 4 KB page zeroed for a new allocation (or a
    mapped file page touched), the cost of memory the allocator handed back to the kernel."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _inputs(c: Candidate, tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Input and a contiguous upstream gradient (CPU grouped_mm backward rejects stride-0 gradients)."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, tokens * c.tokens_factor, hidden)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return x, grad


def _forward(c: Candidate, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            c.module(x)

    return run


def _forward_backward(c: Candidate, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        c.module.zero_grad(set_to_none=True)
        leaf = x.detach().requires_grad_(True)
        c.module(leaf).backward(grad)

    return run


def check_agreement(candidates: list[Candidate], tokens: int, args, dtype, device) -> float:
    """Largest difference between any MoE candidate and moekit's first one on the same input (a sanity check)."""
    moes = [c for c in candidates if c.tokens_factor == 1]
    x, _ = _inputs(moes[0], tokens, args.hidden, dtype, device, args.seed)
    with torch.no_grad():
        ref = moes[0].module(x).float()
        return max((c.module(x).float() - ref).abs().max().item() for c in moes[1:]) if len(moes) > 1 else 0.0


def run_tokens(candidates: list[Candidate], tokens: int, args, dtype, device) -> tuple[list[Result], list[str]]:
    notes = []
    active = []
    for c in candidates:
        if c.impl == "batched_mm" and tokens > args.batched_mm_max_tokens:
            slots = tokens * args.top_k
            gib = slots * 3 * args.hidden * args.intermediate * torch.finfo(dtype).bits / 8 / 2**30
            notes.append(
                f"{c.name} skipped at T={tokens}: it gathers per-slot weights, ~{gib:.0f} GiB "
                f"(limit --batched-mm-max-tokens {args.batched_mm_max_tokens})"
            )
        else:
            active.append(c)
    data = {c.name: _inputs(c, tokens, args.hidden, dtype, device, args.seed + 1) for c in active}
    jobs = {c.name: [("fwd", _forward(c, data[c.name][0]))] for c in active}
    if not args.no_backward:
        for c in active:
            jobs[c.name].append(("fwdbwd", _forward_backward(c, *data[c.name])))
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    results = {c.name: Result(tokens, c.name, dtype_name) for c in active}
    for _ in range(args.warmup):
        for c in active:
            for _kind, fn in jobs[c.name]:
                fn()
    for r in range(args.repeats):
        order = active[r % len(active) :] + active[: r % len(active)]  # rotate who goes first
        for c in order:
            for kind, fn in jobs[c.name]:
                faults = _minor_faults()
                getattr(results[c.name], f"{kind}_ms").append(_timed(fn, device))
                getattr(results[c.name], f"{kind}_faults").append(_minor_faults() - faults)
    ref = results[active[0].name]
    for res in results.values():
        res.fwd_ratio = statistics.median(d / t for d, t in zip(ref.fwd_ms, res.fwd_ms))
        res.fwd_best = min(ref.fwd_ms) / min(res.fwd_ms)
        if res.fwdbwd_ms:
            res.fwdbwd_ratio = statistics.median(d / t for d, t in zip(ref.fwdbwd_ms, res.fwdbwd_ms))
            res.fwdbwd_best = min(ref.fwdbwd_ms) / min(res.fwdbwd_ms)
    return list(results.values()), notes


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "-"


def _ratio(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"


def markdown_table(results: list[Result]) -> str:
    lines = [
        "| T | dtype | candidate | fwd ms | fwd tok/s | fwd ratio | fwd best | fwd+bwd ms | fwd+bwd tok/s "
        "| fwd+bwd ratio | fwd+bwd best | fwd faults | fwd+bwd faults |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        cells = [str(r.tokens), r.dtype, r.name]
        for times, ratio, best in ((r.fwd_ms, r.fwd_ratio, r.fwd_best), (r.fwdbwd_ms, r.fwdbwd_ratio, r.fwdbwd_best)):
            tps = f"{r.tokens / statistics.median(times) * 1e3:.0f}" if times else "-"
            cells += [_ms(times), tps, _ratio(ratio), _ratio(best)]
        cells += [f"{statistics.median(f):.0f}" if f else "-" for f in (r.fwd_faults, r.fwdbwd_faults)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_for(tokens: int) -> float | None:
    """Issue 15's goal for moekit's default block, as a fraction of dense k*T (None: no goal at this T)."""
    return 0.95 if tokens >= 2048 else 0.9 if tokens >= 512 else None


def goal_lines(results: list[Result], tie: float = 0.03) -> list[str]:
    """One verdict per (T, dtype, fwd / fwd+bwd): moekit's default against `goal_for(T)` of dense k*T and against
    the best stock implementation, median ratios of this run; within `tie` of the best stock ratio counts as a tie
    (repeat-to-repeat noise on a shared machine is larger than that)."""
    lines = []
    for tokens, dtype in dict.fromkeys((r.tokens, r.dtype) for r in results):
        goal = goal_for(tokens)
        rows = [r for r in results if (r.tokens, r.dtype) == (tokens, dtype)]
        ours = next((r for r in rows if r.name.endswith("(default)")), None)
        if goal is None or ours is None:
            continue
        for kind in ("fwd", "fwdbwd"):
            mine = getattr(ours, f"{kind}_ratio")
            if mine != mine:
                continue
            best = max((getattr(r, f"{kind}_ratio") for r in rows if r.name.startswith("stock")), default=float("nan"))
            dense_ok, stock_ok = mine >= goal, not mine < best - tie
            verdict = "met" if dense_ok and stock_ok else "MISSED"
            verdict += "" if dense_ok else f" (dense, by {goal - mine:.2f})"
            verdict += "" if stock_ok else f" (stock, by {best - mine:.2f})"
            lines.append(
                f"T={tokens} {dtype} {kind}: {ours.name} {mine:.2f} of dense (goal {goal}), "
                f"best stock {best:.2f}: {verdict}"
            )
    return lines


def summarize(paths: list[Path]) -> str:
    """Median ratios of several runs side by side, as `median [min-max]` over the runs."""
    runs = [json.loads(p.read_text())["results"] for p in paths]
    key = lambda r: (r["tokens"], r.get("dtype", "fp32"), r["name"])  # noqa: E731 - older runs have no dtype
    keys = list(dict.fromkeys(key(r) for run in runs for r in run))
    lines = [
        f"{len(runs)} runs: median [min-max] over runs of each run's median ratio",
        "",
        "| T | dtype | candidate | fwd ratio | fwd+bwd ratio |",
        "| ---: | --- | --- | ---: | ---: |",
    ]
    for tokens, dtype, name in keys:
        cells = []
        for kind in ("fwd_ratio", "fwdbwd_ratio"):
            values = [r[kind] for run in runs for r in run if key(r) == (tokens, dtype, name)]
            values = [v for v in values if v == v]
            cells.append(f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]" if values else "-")
        lines.append(f"| {tokens} | {dtype} | {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def machine_line(args, device: torch.device) -> str:
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        cpu_flags = next(line.split(":", 1)[1].split() for line in info if line.startswith("flags"))
        flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags]
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        cpu, flags = torch.cuda.get_device_name(device), []
    return (
        f"{cpu} ({' '.join(flags) or 'no avx512/amx flags'}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {','.join(args.dtype)}, H={args.hidden} I={args.intermediate} "
        f"E={args.experts} k={args.top_k}, repeats {args.repeats} (+{args.warmup} warm-up)"
    )


def profile(candidates: list[Candidate], tokens: int, args, dtype, device, rows: int = 14) -> str:
    """torch.profiler's self-time table of moekit's default block and of dense k*T, forward and forward+backward."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    picked = [c for c in candidates if c.tokens_factor != 1 or c.name.endswith("(default)")]
    out = []
    for c in picked:
        x, grad = _inputs(c, tokens, args.hidden, dtype, device, args.seed + 1)
        for kind, fn in (("fwd", _forward(c, x)), ("fwd+bwd", _forward_backward(c, x, grad))):
            fn()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.repeats):
                    fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=36)
            out.append(f"### T={tokens} {c.name} {kind} ({args.repeats} runs)\n{table}")
    return "\n".join(out)


def gemm_ceiling(candidates: list[Candidate], tokens: int, args, dtype, device) -> str:
    """The forward matmuls alone, interleaved: dense k*T's three vs every expert's two on its share of the slots
    (the routing of moekit's block on the benchmark input). Their ratio bounds any per-expert-GEMM MoE block."""
    block = next(c.module for c in candidates if c.name.endswith("(default)"))
    x, _ = _inputs(Candidate("", block), tokens, args.hidden, dtype, device, args.seed + 1)
    with torch.no_grad():
        counts = block.gate(x.reshape(tokens, -1))[2].reshape(-1).bincount(minlength=args.experts).tolist()
    H, I, k = args.hidden, args.intermediate, args.top_k
    up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    rows = [torch.randn(n, H, device=device).to(dtype) for n in counts]
    mids = [torch.randn(n, I, device=device).to(dtype) for n in counts]
    xd, md = torch.randn(k * tokens, H, device=device).to(dtype), torch.randn(k * tokens, I, device=device).to(dtype)
    # Outputs written in place, as moekit's block does: fresh ones would add the allocator's page faults.
    dense_out = [xd.new_empty(k * tokens, I), xd.new_empty(k * tokens, I), xd.new_empty(k * tokens, H)]
    expert_out = [(xd.new_empty(n, 2 * I), xd.new_empty(n, H)) for n in counts]

    def dense() -> None:
        torch.mm(xd, up[0, :I].t(), out=dense_out[0])
        torch.mm(xd, up[0, I:].t(), out=dense_out[1])
        torch.mm(md, down[0].t(), out=dense_out[2])

    def experts() -> None:
        for e, (r, m) in enumerate(zip(rows, mids)):
            torch.mm(r, up[e].t(), out=expert_out[e][0])
            torch.mm(m, down[e].t(), out=expert_out[e][1])

    jobs = {"dense": dense, "experts": experts}
    times = {name: [] for name in jobs}
    for fn in jobs.values():
        fn()
    for r in range(args.repeats):
        for name in list(jobs)[r % 2 :] + list(jobs)[: r % 2]:
            times[name].append(_timed(jobs[name], device))
    ratio = statistics.median(d / e for d, e in zip(times["dense"], times["experts"]))
    return (
        f"T={tokens} {next(k for k, v in DTYPES.items() if v == dtype)}: GEMMs only, dense k*T "
        f"{statistics.median(times['dense']):.1f} ms, experts {statistics.median(times['experts']):.1f} ms "
        f"(rows per expert {counts}): ratio {ratio:.2f}"
    )


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares `y = a + b x`: (a, b)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - b * mean_x, b


def call_cost(args, dtype, device) -> str:
    """Fit `t(M) = fixed + M * per_row` to each projection's matmul at several row counts M (four weights rotated,
    as the experts of one layer are), then bound the MoE block: it calls every projection once per expert,
    dense k*T once, so the E - 1 extra calls' fixed cost (packing the weight, reading it from memory) is added
    at any T. The bound is dense / (dense + extra) on the GEMMs alone, before any routing cost."""
    H, I, E, k = args.hidden, args.intermediate, args.experts, args.top_k
    rows = [64, 128, 256, 512, 1024, 2048]
    shapes = {"gate_up": (2 * I, H), "down": (H, I)}
    fits, lines = {}, []
    for name, (n_out, n_in) in shapes.items():
        weights = [torch.randn(n_out, n_in, device=device).to(dtype) for _ in range(4)]
        xs = {m: torch.randn(m, n_in, device=device).to(dtype) for m in rows}
        outs = {m: torch.empty(m, n_out, device=device, dtype=dtype) for m in rows}
        times = {m: [] for m in rows}
        for r in range(args.repeats + 2):
            for j, m in enumerate(rows[r % len(rows) :] + rows[: r % len(rows)]):
                w = weights[(r + j) % len(weights)]
                times[m].append(_timed(lambda x=xs[m], w=w, o=outs[m]: torch.mm(x, w.t(), out=o), device))
        med = {m: statistics.median(times[m][2:]) for m in rows}
        fixed, per_row = fits[name] = line_fit(rows, [med[m] for m in rows])
        mb = n_out * n_in * weights[0].element_size() / 1e6
        lines.append(
            f"{name} [{n_out}x{n_in}] ({mb:.1f} MB): {fixed:.2f} ms per call + {per_row * 1e3:.2f} ms per 1000 rows "
            f"(medians by M: {', '.join(f'{m}: {med[m]:.2f}' for m in rows)})"
        )
    extra = (E - 1) * sum(fixed for fixed, _ in fits.values())
    for tokens in args.tokens:
        dense = sum(fixed + k * tokens * per_row for fixed, per_row in fits.values())
        lines.append(
            f"T={tokens}: dense k*T GEMMs ~{dense:.1f} ms, the experts' {E - 1} extra calls per projection "
            f"+{extra:.1f} ms: at most {dense / (dense + extra):.2f} of dense k*T"
        )
    name = next(k for k, v in DTYPES.items() if v == dtype)
    return "\n".join(f"{name}: {line}" for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_line(args, device))
    print(f"moekit default experts implementation here: {default_implementation(device)}")
    load_before = os.getloadavg()
    all_results, all_notes = [], []
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        if args.call_cost:
            print(call_cost(args, dtype, device), flush=True)
            continue
        candidates = build_candidates(args, dtype, device)
        for tokens in args.tokens:
            if args.profile:
                print(f"## {dtype_name}\n" + profile(candidates, tokens, args, dtype, device), flush=True)
                continue
            if args.gemm_ceiling:
                print(gemm_ceiling(candidates, tokens, args, dtype, device), flush=True)
                continue
            usable = [c for c in candidates if c.impl != "batched_mm" or tokens <= args.batched_mm_max_tokens]
            diff = check_agreement(usable, tokens, args, dtype, device)
            all_notes.append(f"T={tokens} {dtype_name}: largest output difference between MoE candidates {diff:.2e}")
            results, notes = run_tokens(candidates, tokens, args, dtype, device)
            all_results += results
            all_notes += notes
            print(markdown_table(results), flush=True)
    if args.profile or args.gemm_ceiling or args.call_cost:
        return 0
    load_after = os.getloadavg()
    all_notes.append(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print("\n" + markdown_table(all_results))
    print(
        "\nratio = median over repeats of t(dense k*T) / t(candidate) measured in the same repeat; "
        "best = min t(dense) / min t(candidate); higher is better"
    )
    all_notes += goal_lines(all_results, args.tie)
    for note in all_notes:
        print(f"- {note}")
    if args.json:
        payload = {
            "machine": machine_line(args, device),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": [asdict(r) for r in all_results],
            "notes": all_notes,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
