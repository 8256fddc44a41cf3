"""bench/moe_block.py keeps running against the current API (tiny shapes; nothing here is timed)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "moe_block.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("moe_block_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # main() sets it
    del sys.modules[spec.name]


def test_bench_runs_and_candidates_agree(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = "--tokens 8 40 --hidden 16 --intermediate 24 --repeats 1 --warmup 0 --threads 1 --batched-mm-max-tokens 8"
    assert bench.main([*args.split(), "--dtype", "fp32", "bf16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = {(r["tokens"], r["dtype"], r["name"]) for r in data["results"]}
    assert (8, "fp32", "stock batched_mm") in names and (40, "fp32", "stock batched_mm") not in names
    assert (40, "fp32", "moekit eager (default)") in names and (40, "bf16", "moekit eager (default)") in names
    dense = [r for r in data["results"] if r["name"] == "dense k*T"]
    assert len(dense) == 4 and all(r["fwd_ratio"] == 1.0 and len(r["fwdbwd_ms"]) == 1 for r in dense)
    assert all(len(r["fwd_faults"]) == 1 and r["fwd_faults"][0] >= 0 for r in data["results"])
    diffs = {n.split(":")[0]: float(n.rsplit(" ", 1)[1]) for n in data["notes"] if "largest output difference" in n}
    assert len(diffs) == 4 and max(diffs["T=8 fp32"], diffs["T=40 fp32"]) < 1e-5  # moekit and stock agree
    assert max(diffs["T=8 bf16"], diffs["T=40 bf16"]) < 0.1  # bf16: other kernels, other roundings
    assert any("stock batched_mm skipped at T=40" in n for n in data["notes"])
    printed = capsys.readouterr().out
    assert "| 40 | bf16 | moekit grouped_mm |" in printed
    assert bench.main(["--summarize", str(out), str(out)]) == 0
    assert "| 40 | bf16 | moekit eager (default) |" in capsys.readouterr().out


def test_goal_lines_judge_against_dense_and_the_best_stock(bench):
    def result(tokens, name, fwd, fwdbwd, dtype="fp32"):
        return bench.Result(tokens, name, dtype, fwd_ratio=fwd, fwdbwd_ratio=fwdbwd)

    rows = [
        result(2048, "moekit eager (default)", 0.96, 0.93),
        result(2048, "stock eager", 1.00, 0.80),
        result(512, "moekit eager (default)", 0.91, 0.85, "bf16"),
        result(512, "stock grouped_mm", 0.70, 0.70, "bf16"),
        result(64, "moekit eager (default)", 0.10, 0.10),  # no goal below T=512
    ]
    lines = bench.goal_lines(rows, tie=0.03)
    assert len(lines) == 4
    assert lines[0].startswith("T=2048 fp32 fwd:") and lines[0].endswith("MISSED (stock, by 0.04)")
    assert lines[1].endswith("MISSED (dense, by 0.02)")
    assert lines[2].startswith("T=512 bf16 fwd:") and lines[2].endswith(": met")
    assert lines[3].endswith("MISSED (dense, by 0.05)")


def test_bench_profiles_the_default_block(bench, capsys):
    args = "--profile --tokens 8 --hidden 16 --intermediate 24 --repeats 1 --threads 1 --dtype fp32 --impls eager"
    assert bench.main(args.split()) == 0
    printed = capsys.readouterr().out
    assert "### T=8 moekit eager (default) fwd+bwd" in printed and "### T=8 dense k*T fwd" in printed
    assert "_RoutedMlps" in printed  # the fused node shows up in the profile


def test_bench_times_the_gemm_ceiling(bench, capsys):
    args = "--gemm-ceiling --tokens 8 --hidden 16 --intermediate 24 --repeats 2 --threads 1 --dtype bf16 --impls eager"
    assert bench.main(args.split()) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("T=8 bf16: GEMMs only"))
    counts = [int(c) for c in line.split("[")[1].split("]")[0].split(", ")]
    assert sum(counts) == 16 and float(line.rsplit(" ", 1)[1]) > 0  # k*T slots over the experts


def test_bench_fits_the_fixed_cost_per_matmul_call(bench, capsys):
    assert bench.line_fit([1, 2, 4, 8], [2 + 3 * x for x in (1, 2, 4, 8)]) == pytest.approx((2.0, 3.0))
    args = "--call-cost --tokens 8 64 --hidden 16 --intermediate 24 --repeats 1 --threads 1 --dtype fp32"
    assert bench.main(args.split()) == 0
    printed = capsys.readouterr().out
    assert "fp32: gate_up [48x16]" in printed and "fp32: down [16x24]" in printed
    bounds = [float(x.rsplit(" ", 4)[1]) for x in printed.splitlines() if x.startswith("fp32: T=")]
    assert len(bounds) == 2  # one bound per T
