"""DeepSpeed ZeRO-2/3 through `deepspeed.initialize` (the `deepspeed` extra: `pip install moekit[deepspeed]`).

The recipe supplies batch sizes, accumulation, clipping and precision; `distributed.deepspeed_config` may add
anything else (offload, bucket sizes) and may not contradict the recipe. Under ZeRO-3 a model whose decoder
layers were left on the meta device (`distributed.load: auto`) is partitioned one layer at a time as it is read.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.arch.detect import hidden_size
from moekit.config import load_yaml
from moekit.train.engine import Engine, adamw, layers_path, param_groups
from moekit.train.groups import hf_model


def deepspeed_module():
    try:
        import deepspeed
    except ImportError:
        raise ValueError(
            "distributed.mode is deepspeed but deepspeed is not installed; install the extra: "
            "pip install 'moekit[deepspeed]'"
        ) from None
    return deepspeed


# Bucket and persistence sizes that follow the model's width: transformers' Trainer fills these `auto` entries
# with the same rules (`HfTrainerDeepSpeedConfig.trainer_config_finalize`, which needs TrainingArguments, hence
# these lines). DeepSpeed's fixed defaults (a 5e8-element reduce bucket, tensors under 1e5 elements kept whole on
# every process) suit no model size in particular.
SIZED_BY_WIDTH: dict[str, tuple[tuple[int, ...], Any]] = {
    "reduce_bucket_size": ((2, 3), lambda h: h * h),
    "stage3_prefetch_bucket_size": ((3,), lambda h: int(0.9 * h * h)),
    "stage3_param_persistence_threshold": ((3,), lambda h: 10 * h),
}


def deepspeed_config(engine: Engine, width: int | None = None) -> dict[str, Any]:
    """The recipe's settings in DeepSpeed's terms, with the user's file merged underneath. With the model's
    `width` (hidden size), the `SIZED_BY_WIDTH` settings the file leaves out or sets to `auto` follow it."""
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": engine.micro_batch,
        "gradient_accumulation_steps": engine.grad_accum,
        "train_batch_size": engine.micro_batch * engine.grad_accum * engine.world_size,
        "bf16": {"enabled": engine.precision == "bf16"},
        "zero_optimization": {"stage": engine.config.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if engine.config.deepspeed_config is None:
        return _sized(ours, width, "distributed")
    path = Path(engine.config.deepspeed_config)
    user = json.loads(path.read_text()) if path.suffix == ".json" else load_yaml(path)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if user.get(key, "auto") not in ("auto", ours[key]):
            raise ValueError(f"{path}: {key}={user[key]} contradicts the recipe ({ours[key]}); remove it or use 'auto'")
    if "optimizer" in user or "scheduler" in user:
        raise ValueError(f"{path}: the recipe sets the optimizer and schedule; remove 'optimizer'/'scheduler' here")
    merged = {**user, **{k: v for k, v in ours.items() if k != "zero_optimization"}}
    merged["zero_optimization"] = {**user.get("zero_optimization", {}), "stage": engine.config.zero_stage}
    return _sized(merged, width, str(path))


def _sized(config: dict[str, Any], width: int | None, where: str) -> dict[str, Any]:
    zero = config["zero_optimization"]
    for key, (stages, rule) in SIZED_BY_WIDTH.items():
        if zero["stage"] not in stages or zero.get(key, "auto") != "auto":
            continue
        if width is None:
            if key in zero:
                raise ValueError(
                    f"{where}: zero_optimization.{key} is 'auto' but the model's config has no hidden_size to "
                    "size it by; give a number"
                )
            continue
        zero[key] = rule(width)
    return config


def _cast_params(module: nn.Module, precision: str) -> None:
    """bf16: every floating parameter not yet partitioned in bf16, as `deepspeed.initialize` casts a model it
    partitions itself (it leaves a model that `zero.Init` already partitioned as it is)."""
    if precision != "bf16":
        return
    for param in module.parameters():
        if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != torch.bfloat16:
            param.data = param.data.to(torch.bfloat16)


class DeepSpeedEngine(Engine):
    """ZeRO-2 shards optimizer state and gradients, ZeRO-3 the weights too; DeepSpeed accumulates itself."""

    mode = "deepspeed"

    def prepare(self, module, trainable, optimizer, scheduler):
        deepspeed = deepspeed_module()
        config = deepspeed_config(self, hidden_size(hf_model(module.model).config))
        self.layers = layers_path(module)
        config["gradient_clipping"] = float(self.max_grad_norm or 0.0)
        if module.deferred is not None:
            self._partition_deferred(deepspeed, module, config)
        base = adamw(param_groups(module, trainable, optimizer), optimizer)
        if self.config.zero_stage == 2:  # ZeRO-3 holds no full weight outside its module (see docs/training.md)
            module.touch = set(trainable)
        self.module, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=base, config=config)
        # The schedule drives the wrapped optimizer's param groups (shared with ZeRO's), stepped by the loop.
        self.scheduler = scheduler(base)
        self._base = base

    def _partition_deferred(self, deepspeed, module, config: dict[str, Any]) -> None:
        """ZeRO-3 with the decoder layers still on meta (`train.outputs.load_model(..., sharded=True)`): read one
        layer whole, let `zero.Init` partition it (each process keeps 1/N of every tensor) and free it before
        the next, so a process holds its partitions plus one layer. `deepspeed.initialize` then partitions the
        rest (embeddings, vision tower, head), which `load_deferred` read whole."""
        from moekit.modeling.sharded import materialize_module

        deferred, module.deferred = module.deferred, None
        if self.config.zero_stage != 3:
            raise ValueError("ZeRO-2 keeps whole weights on every process: load the model whole (stage.sharded_load)")
        deepspeed.init_distributed()  # zero.Init reads the world size from it (initialize would do it later)
        for unit in self._layer_units(module):
            materialize_module(deferred, unit, self.device)
            _cast_params(unit, self.precision)
            deepspeed.zero.Init(module=unit, config_dict_or_path=config)
        _cast_params(module, self.precision)

    def unwrapped(self):
        return self.module.module

    def backward(self, loss):
        self.module.backward(loss, scale_wrt_gas=False)  # the loop already scales for accumulation

    def autocast(self):
        return contextlib.nullcontext()  # bf16 weights: DeepSpeed keeps the module in bf16 with fp32 masters

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def micro_step_done(self, last):
        # DeepSpeed counts micro-steps in `step()` and updates only at the accumulation boundary.
        if not last:
            self.module.step()

    def step(self):
        self.module.step()
        norm = self.module.get_global_grad_norm()
        self.scheduler.step()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self._base.param_groups[0]["lr"])

    def full_state_dict(self, skip=()):
        if skip:  # the streamed save's rest
            from moekit.train.stream_save import gathered_state

            return gathered_state(self.unwrapped(), skip, self._gather, self.is_main)
        if self.config.zero_stage == 3:
            state = self.module._zero3_consolidated_16bit_state_dict()
        else:
            state = self.unwrapped().state_dict()
        if not self.is_main or state is None:
            return None
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state.items()}

    def layer_stream(self):
        if self.config.zero_stage != 3 or self.config.gather == "whole":
            return None  # ZeRO-2 keeps whole weights on every process
        from moekit.train.stream_save import layer_stream

        return layer_stream(self.unwrapped(), self.layers, self._gather)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The full tensor on CPU (fp32 if floating, as `full_state_dict`) in the main process, None elsewhere;
        a collective for a ZeRO-3 partition (`GatheredParameters` frees the gathered copy again on exit)."""
        partitioned = [tensor] if hasattr(tensor, "ds_id") else []
        with deepspeed_module().zero.GatheredParameters(partitioned, modifier_rank=None):
            if not self.is_main:
                return None
            dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
            return tensor.detach().to("cpu", dtype, copy=True)

    def save_state(self, directory: Path) -> None:
        self.module.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load_state(self, directory: Path) -> None:
        path, _ = self.module.load_checkpoint(
            str(directory / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"{directory / 'deepspeed'}: no DeepSpeed state to resume from")

    def set_trainable(self, names):
        raise ValueError("phases are not supported with DeepSpeed (its optimizer fixes the trainable set)")
