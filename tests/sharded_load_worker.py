"""Run under torchrun by test_sharded_load: wrap CKPT under FSDP2 loaded whole and loaded by shards and write
each process's comparison to OUT/params-<rank>.json; then run RECIPE both ways into OUT/sharded, OUT/whole."""

import json
import sys
from pathlib import Path

import torch

from moekit.pipeline import run_plan
from moekit.recipe import load_plan
from moekit.recipe.schema import Distributed, Optimizer
from moekit.train.engine import Fsdp2Engine, process_state
from moekit.train.module import TrainModule
from moekit.train.outputs import load_model


def wrapped(ckpt: str, sharded: bool) -> tuple[Fsdp2Engine, dict[str, bool]]:
    model = load_model(ckpt, where="worker", sharded=sharded)
    module = TrainModule(model.train())
    meta = {n: p.is_meta for n, p in module.named_parameters()}
    engine = Fsdp2Engine(Distributed(mode="fsdp2"), "fp32", 1, 1, None)
    names = {n for n, _ in module.named_parameters()}
    engine.prepare(module, names, Optimizer(lr=1e-3), lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1))
    return engine, meta


def compare(ckpt: str, out: Path) -> None:
    whole, whole_meta = wrapped(ckpt, sharded=False)
    shards, shard_meta = wrapped(ckpt, sharded=True)
    left = dict(whole.module.named_parameters())
    differ = [n for n, p in shards.module.named_parameters() if not torch.equal(p.to_local(), left[n].to_local())]
    local = sum(p.to_local().numel() for p in shards.module.parameters())
    full = whole.full_state_dict(), shards.full_state_dict()
    gathered = [] if full[0] is None else [k for k in full[0] if not torch.equal(full[0][k], full[1][k])]
    buffers = dict(whole.module.named_buffers())
    buffer_differ = [n for n, b in shards.module.named_buffers() if not torch.equal(b, buffers[n])]
    result = {
        "differ": differ,
        "gathered_differ": gathered,
        "buffers_differ": buffer_differ,
        "deferred": sorted(n for n, m in shard_meta.items() if m),
        "whole_meta": sorted(n for n, m in whole_meta.items() if m),
        "local_numel": local,
        "total_numel": sum(p.numel() for p in shards.module.parameters()),
        "params": len(left),
    }
    (out / f"params-{whole.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    ckpt, recipe, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    process_state()
    compare(ckpt, out)
    run_plan(load_plan(recipe, [f"output_dir={out}/sharded"]))
    run_plan(load_plan(recipe, [f"output_dir={out}/whole", "stages[0].distributed.load=whole"]))
