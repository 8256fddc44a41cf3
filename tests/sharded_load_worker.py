"""Run under torchrun by test_sharded_load: wrap CKPT loaded whole and loaded by shards and write each
process's comparison to OUT/params-<rank>.json; then run RECIPE both ways into OUT/sharded, OUT/whole (the
latter also gathering the whole model to save it).

MODE (default fsdp2) picks the engine: `fsdp2` compares every local shard and the gathered state; `zero3`
compares each process's ZeRO-3 partitions (`ds_tensor`) and the consolidated state; `frozen` writes the shard
dtypes of a bf16 FSDP2 wrap to OUT/dtypes-<rank>.json and runs RECIPE with frozen bf16 shards (OUT/sharded) and
with fp32 ones (OUT/whole)."""

import json
import sys
from pathlib import Path

import torch

from moekit.pipeline import run_plan
from moekit.recipe import load_plan
from moekit.recipe.schema import Distributed, Group, Optimizer
from moekit.train.engine import Fsdp2Engine, process_state
from moekit.train.groups import select
from moekit.train.module import TrainModule
from moekit.train.outputs import load_model


def wrapped(ckpt: str, sharded: bool, mode: str):
    model = load_model(ckpt, where="worker", sharded=sharded)
    module = TrainModule(model.train())
    meta = {n: p.is_meta for n, p in module.named_parameters()}
    if mode == "zero3":
        from moekit.train.deepspeed_engine import DeepSpeedEngine

        engine = DeepSpeedEngine(Distributed(mode="deepspeed", zero_stage=3), "fp32", 1, 1, None)
    else:
        engine = Fsdp2Engine(Distributed(mode="fsdp2"), "fp32", 1, 1, None)
    names = {n for n, _ in module.named_parameters()}
    engine.prepare(module, names, Optimizer(lr=1e-3), lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1))
    return engine, meta


def local(param: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: FSDP2's local shard or ZeRO-3's partition."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.to_local()


def compare(ckpt: str, out: Path, mode: str) -> None:
    whole, whole_meta = wrapped(ckpt, sharded=False, mode=mode)
    shards, shard_meta = wrapped(ckpt, sharded=True, mode=mode)
    left = dict(whole.unwrapped().named_parameters())
    params = list(shards.unwrapped().named_parameters())
    differ = [n for n, p in params if not torch.equal(local(p), local(left[n]))]
    full = whole.full_state_dict(), shards.full_state_dict()
    gathered = [] if full[0] is None else [k for k in full[0] if not torch.equal(full[0][k], full[1][k])]
    buffers = dict(whole.unwrapped().named_buffers())
    buffer_differ = [n for n, b in shards.unwrapped().named_buffers() if not torch.equal(b, buffers[n])]
    result = {
        "differ": differ,
        "gathered_differ": gathered,
        "gathered": 0 if full[0] is None else len(full[0]),
        "buffers_differ": buffer_differ,
        "deferred": sorted(n for n, m in shard_meta.items() if m),
        "whole_meta": sorted(n for n, m in whole_meta.items() if m),
        "local_numel": sum(local(p).numel() for _, p in params),
        "total_numel": sum(getattr(p, "ds_numel", p.numel()) for _, p in params),
        "params": len(left),
    }
    (out / f"params-{whole.rank}.json").write_text(json.dumps(result))


def frozen_dtypes(ckpt: str, out: Path) -> None:
    """FSDP2 in bf16 with only the routers trained: the dtype of every local shard, by parameter name."""
    model = load_model(ckpt, where="worker", sharded=True)
    module = TrainModule(model.train())
    engine = Fsdp2Engine(Distributed(mode="fsdp2"), "bf16", 1, 1, None)
    trained = set(select(module, [Group.model_validate("router")], "worker"))
    engine.prepare(module, trained, Optimizer(lr=1e-3), lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1))
    dtypes = {n: [str(local(p).dtype), n in trained] for n, p in module.named_parameters()}
    (out / f"dtypes-{engine.rank}.json").write_text(json.dumps(dtypes))


if __name__ == "__main__":
    torch.set_num_threads(1)
    ckpt, recipe, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "fsdp2"
    process_state()
    if mode == "frozen":  # bf16 frozen shards (the default) against fp32 ones
        frozen_dtypes(ckpt, out)
        run_plan(load_plan(recipe, [f"output_dir={out}/sharded"]))
        run_plan(load_plan(recipe, [f"output_dir={out}/whole", "stages[0].distributed.frozen_weights=fp32"]))
        sys.exit(0)
    compare(ckpt, out, mode)
    run_plan(load_plan(recipe, [f"output_dir={out}/sharded"]))
    whole = ["stages[0].distributed.load=whole", "stages[0].distributed.gather=whole"]
    run_plan(load_plan(recipe, [f"output_dir={out}/whole", *whole]))
