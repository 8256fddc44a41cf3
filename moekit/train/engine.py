"""How one training step runs on one or many processes: single, DDP (through accelerate), FSDP2, DeepSpeed.

The loop in `loop.py` only talks to an `Engine`: wrap the module, build the optimizer, run micro-steps with or
without gradient sync, clip and step, and save / restore the training state. Launch several processes with
`torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N` (on CPU machines too).

Why not accelerate for everything: its FSDP integration does not shard on CPU and its DeepSpeed integration
asserts on CPU batch sizes, so the sharded modes call `torch.distributed.fsdp.fully_shard` and
`deepspeed.initialize` directly; the same code then runs on CPU (gloo) and GPU (nccl).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object, reduce
from torch import nn

from moekit.recipe.schema import Distributed, Optimizer
from moekit.train.groups import hf_model

if TYPE_CHECKING:
    from moekit.train.stream_save import LayerStream

SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def process_state():
    """accelerate's view of this process (initialises the process group under torchrun / accelerate launch)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def resolve_mode(config: Distributed, world_size: int) -> str:
    if config.mode == "auto":
        return "single" if world_size == 1 else "ddp"
    if config.mode == "single" and world_size > 1:
        raise ValueError(
            f"distributed.mode is single but {world_size} processes were launched; use ddp/fsdp2/deepspeed"
        )
    return config.mode


SHARDED_MODES = ("fsdp2", "deepspeed")
_heap_bounded = False


def bound_host_heap(mode: str) -> bool:
    """In a CPU process of a sharded mode, fix glibc malloc's mmap threshold at its initial 128 KiB; returns
    whether it is fixed. Call it before the model loads: allocations made earlier keep their place.

    glibc raises the threshold (up to 32 MiB) each time a larger mmapped block is freed; FSDP2's per-layer
    all-gather buffers then come from the heap and stay resident after they are freed, which cost as much as the
    sharding saved (docs/benchmarks.md "Memory per rank"). A fixed threshold keeps them mmapped and returned at
    free, as `MALLOC_MMAP_THRESHOLD_=131072` would. Left alone: GPU processes (their buffers are CUDA memory),
    other C libraries (musl, macOS) and a process started with `MALLOC_MMAP_THRESHOLD_` set.
    """
    import ctypes
    import os
    import platform

    global _heap_bounded
    if _heap_bounded:
        return True
    if mode not in SHARDED_MODES or torch.cuda.is_available() or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    m_mmap_threshold = -3  # glibc's malloc.h
    _heap_bounded = ctypes.CDLL(None).mallopt(m_mmap_threshold, 128 * 1024) == 1
    return _heap_bounded


def param_groups(module: nn.Module, names: set[str], optimizer: Optimizer) -> list[dict[str, Any]]:
    """AdamW groups over the parameters `names`: weight decay for matrices, none for 1-D tensors unless asked."""
    decay, plain = [], []
    for name, param in module.named_parameters():
        if name in names:
            (decay if param.ndim >= 2 or optimizer.decay_1d else plain).append(param)
    groups = [{"params": decay, "weight_decay": optimizer.weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def adamw(groups: list[dict[str, Any]], optimizer: Optimizer) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps)


class Engine(abc.ABC):
    """Common state: processes, device, the wrapped module, optimizer and schedule."""

    mode = "single"

    def __init__(
        self, config: Distributed, precision: str, grad_accum: int, micro_batch: int, max_grad_norm: float | None
    ):
        self.config = config
        self.precision = precision
        self.grad_accum = grad_accum
        self.micro_batch = micro_batch
        self.max_grad_norm = max_grad_norm
        bound_host_heap(self.mode)  # stage.build_start already did, before loading; here for direct users
        state = process_state()
        self.rank, self.world_size, self.device = state.process_index, state.num_processes, state.device
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.layers: str | None = None  # the decoder layers' path in the model, found by sharded engines

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def unwrapped(self) -> nn.Module:
        return self.module

    @abc.abstractmethod
    def prepare(
        self, module: nn.Module, trainable: set[str], optimizer: Optimizer, scheduler: SchedulerFactory
    ) -> None:
        """Wrap `module` for this mode and build AdamW over `trainable` (every parameter any phase trains)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward and backward; gradients are reduced only on the last one."""
        return contextlib.nullcontext()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def micro_step_done(self, last: bool) -> None:  # noqa: B027 (a hook; only DeepSpeed needs it)
        """Called after each micro-step's backward (DeepSpeed counts micro-steps itself)."""

    @abc.abstractmethod
    def step(self) -> float:
        """Clip, update, advance the schedule, clear gradients; return the gradient norm before clipping."""

    def set_trainable(self, names: set[str]) -> None:
        """Switch which parameters receive gradients (phases); the optimizer keeps every state it has."""
        for name, param in self.unwrapped().named_parameters():
            param.requires_grad_(name in names)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`tensor` summed (or averaged, `op="mean"`) over every process: accelerate's `reduce`."""
        return reduce(tensor.detach(), reduction=op)

    def gather_objects(self, obj: Any) -> list[Any]:
        """One picklable object per process, in rank order: accelerate's `gather_object`."""
        return gather_object([obj])

    def barrier(self) -> None:
        process_state().wait_for_everyone()

    @abc.abstractmethod
    def full_state_dict(self, skip: Collection[str] = ()) -> dict[str, torch.Tensor] | None:
        """The whole module's weights on CPU in the main process (None elsewhere), but for the `skip` keys;
        every process must call it."""

    def layer_stream(self) -> LayerStream | None:
        """The decoder-layer tensors this engine gathers one at a time while the output is written (their keys
        go in `full_state_dict`'s `skip`); None: the whole state is gathered at once."""
        return None

    def _layer_units(self, module: nn.Module) -> list[nn.Module]:
        """The decoder layers (at `self.layers`), each its own shard unit: FSDP2 gathers them one at a time. The
        vision tower stays with the root because a process whose micro-batch holds no image or video skips it,
        and per-block gathers would then deadlock."""
        return list(hf_model(module.model).get_submodule(self.layers))

    def save_state(self, directory: Path) -> None:
        """Model and optimizer state for resuming (every process calls it; DCP writes each shard once)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.unwrapped(), self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory / "state"))

    def load_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.unwrapped(), self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(directory / "state"))
        set_state_dict(
            self.unwrapped(), self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )


class AccelerateEngine(Engine):
    """One process, or DDP: accelerate places the module and wraps it."""

    def __init__(self, *args: Any, mode: str = "single", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mode = mode
        self.accelerator = None

    def prepare(self, module, trainable, optimizer, scheduler):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        find_unused = self.config.find_unused_parameters
        # Precision stays out of accelerate: its state is per process and a pipeline may mix fp32 and bf16 stages,
        # so autocast comes from `Engine.autocast`.
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
        )
        # Touching every trainable parameter keeps a micro-batch that skips the vision tower (a text sample while
        # the projector trains) differentiable, and gives DDP a gradient for every parameter on every process.
        module.touch = set(trainable)
        self.module = self.accelerator.prepare_model(module)
        self.optimizer = adamw(param_groups(self.unwrapped(), trainable, optimizer), optimizer)
        self.scheduler = scheduler(self.optimizer)

    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.module, keep_torch_compile=False)

    def sync(self, last_micro_step: bool):
        if last_micro_step or not self.distributed:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.module)

    def backward(self, loss):
        self.accelerator.backward(loss)

    def step(self):
        params = [p for p in self.unwrapped().parameters() if p.grad is not None]
        limit = self.max_grad_norm or float("inf")
        norm = self.accelerator.clip_grad_norm_(params, limit) if params else torch.zeros(())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def set_trainable(self, names):
        # DDP fixes the parameters it reduces when it is built: wrap again for the new trainable set.
        module = self.unwrapped()
        super().set_trainable(names)
        if self.distributed:
            old, self.module = self.module, self.accelerator.prepare_model(module)
            models = getattr(self.accelerator, "_models", [])
            if old in models:  # let the old wrapper (and its gradient buckets) go
                models.remove(old)

    def full_state_dict(self, skip=()):
        if not self.is_main:
            return None
        return {k: v.detach().cpu() for k, v in self.unwrapped().state_dict().items() if k not in skip}


class Fsdp2Engine(Engine):
    """FSDP2: every decoder layer is its own shard group, the rest (embeddings, vision tower, heads) the root's."""

    mode = "fsdp2"

    def prepare(self, module, trainable, optimizer, scheduler):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        deferred = module.deferred
        if deferred is not None and self.precision == "bf16" and self.config.frozen_weights == "auto":
            frozen_in_bf16(module, trainable, deferred)
        if deferred is None:
            module.to(self.device)  # otherwise fully_shard moves what is real and leaves the meta layers be
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if self.precision == "bf16" else None, reduce_dtype=torch.float32
        )
        options = dict(mp_policy=policy, reshard_after_forward=self.config.reshard_after_forward)
        # Every process must reduce the decoder layers in the same order: FSDP2 hooks a layer's reduction on its
        # inputs, which need gradients even when this process's micro-batch has no trainable part before them.
        hf_model(module.model).enable_input_require_grads()
        self.layers = layers_path(module)
        units = self._layer_units(module)
        in_units = {id(p) for unit in units for p in unit.parameters()}
        module.touch = {n for n, p in module.named_parameters() if n in trainable and id(p) not in in_units}
        for unit in units:
            fully_shard(unit, **options)
        fully_shard(module, **options)
        if deferred is not None:  # each process reads its own rows of the layers it now holds a shard of
            from moekit.modeling.sharded import materialize

            materialize(deferred, self.device)
            module.deferred = None
        self.module = module
        self.optimizer = adamw(param_groups(module, trainable, optimizer), optimizer)
        self.scheduler = scheduler(self.optimizer)

    def autocast(self):
        return contextlib.nullcontext()  # the mixed-precision policy casts parameters itself

    @contextlib.contextmanager
    def sync(self, last_micro_step: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(last_micro_step)
        yield

    def step(self):
        params = [p for p in self.module.parameters() if p.grad is not None]
        limit = self.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit) if params else torch.zeros(())
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def full_state_dict(self, skip=()):
        from moekit.train.stream_save import gathered_state

        return gathered_state(self.module, skip, self._gather, self.is_main)

    def layer_stream(self):
        if self.config.gather == "whole":
            return None
        from moekit.train.stream_save import layer_stream

        return layer_stream(self.module, self.layers, self._gather)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The full tensor on CPU in the main process (None elsewhere); a collective for a sharded one."""
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if not self.is_main:
            return None  # a frozen parameter kept in bf16 (`frozen_in_bf16`) is saved in fp32, as before
        return full.detach().to("cpu", torch.float32 if full.is_floating_point() else full.dtype)


def frozen_in_bf16(module: nn.Module, trainable: set[str], deferred: Any) -> None:
    """Under FSDP2 with `precision: bf16`, keep the frozen parameters that the checkpoint stores in bf16 in bf16.
    The mixed-precision policy gives every layer's compute copy in bf16 anyway, so the forward and backward do
    not change. The saved values do not change either: the stored ones were bf16. Only their shards halve.
    Parameters trained in any phase keep fp32 masters."""
    trained = {id(p) for n, p in module.named_parameters(remove_duplicate=False) if n in trainable}  # tied too
    for name, param in hf_model(module.model).named_parameters():
        if id(param) in trained or not param.is_floating_point() or param.dtype == torch.bfloat16:
            continue
        if deferred.stored_dtype(name) == "bfloat16":
            param.data = param.data.to(torch.bfloat16)  # meta stays meta; the rest was read from bf16: exact


def layers_path(module: nn.Module) -> str:
    """Where the decoder layers are in `module`'s model. Found while the weights are whole: structural detection
    may run a layer's FFN, which it cannot once they are sharded or partitioned."""
    from moekit.arch import resolve_arch

    return resolve_arch(hf_model(module.model)).layers
