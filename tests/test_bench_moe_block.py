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
    assert bench.main([*args.split(), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = {(r["tokens"], r["name"]) for r in data["results"]}
    assert (8, "stock batched_mm") in names and (40, "stock batched_mm") not in names
    assert (40, "moekit eager (default)") in names
    dense = [r for r in data["results"] if r["name"] == "dense k*T"]
    assert all(r["fwd_ratio"] == 1.0 and len(r["fwdbwd_ms"]) == 1 for r in dense)
    diffs = [float(n.rsplit(" ", 1)[1]) for n in data["notes"] if "largest output difference" in n]
    assert len(diffs) == 2 and max(diffs) < 1e-5  # moekit and stock blocks route and compute identically
    assert any("stock batched_mm skipped at T=40" in n for n in data["notes"])
    printed = capsys.readouterr().out
    assert "| 40 | moekit grouped_mm |" in printed
    assert bench.main(["--summarize", str(out), str(out)]) == 0
    assert "2 runs: median [min-max]" in capsys.readouterr().out
