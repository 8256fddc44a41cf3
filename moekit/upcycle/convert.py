"""Streaming upcycling: build an MoE checkpoint from checkpoints on disk with bounded memory.

Every tensor is planned (key, shape, dtype) and every source validated before the first byte is written.
Then tensors are produced one at a time (base tensors are memory-mapped; an MoE layer's fused experts are the
largest thing held) and streamed into planned shards inside a temporary directory that is renamed into place
only when complete.
"""

from __future__ import annotations

import copy
import re
import shutil
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.arch import ArchAdapter, resolve_arch
from moekit.config.provenance import ENCODERS_FILE, PROVENANCE_FILES, Provenance, read_provenance, write_provenance
from moekit.config.record import MoeRecord
from moekit.io.atomic import atomic_dir, is_nonempty_dir
from moekit.io.files import copy_side_files
from moekit.io.names import KeyNames
from moekit.io.overlap import check_apart
from moekit.io.progress import ConversionProgress
from moekit.io.reader import CheckpointError, CheckpointReader
from moekit.io.writer import PlannedTensor, plan_shards, write_index, write_shard
from moekit.modeling.classes import moekit_classes
from moekit.modeling.meta_model import meta_model, read_config
from moekit.upcycle.checkpoint_sources import CheckpointSource, LoraSource, checkpoint_source, kept_buffer
from moekit.upcycle.checks import check_config_matches
from moekit.upcycle.init import expert_tensors, plugin_expert_inits, router_weight
from moekit.upcycle.layout import resolve_layers
from moekit.upcycle.spec import UpcycleSpec
from moekit.upcycle.surgery import build_record
from moekit.upcycle.verify import check_layer


@dataclass
class ConversionReport:
    output: Path
    bytes_written: int = 0
    seconds: float = 0.0
    moe_layers: list[int] = field(default_factory=list)
    divergence: dict[str, dict[str, float]] = field(default_factory=dict)  # expert -> tensor group -> max |diff|
    warnings: list[str] = field(default_factory=list)


def _group(key: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", key)


class _Plan:
    """Everything the converter knows before writing: sources, keys, shapes."""

    def __init__(self, spec: UpcycleSpec, allow_pickle: bool, dtype: torch.dtype | None, allow_nonfinite: bool = False):
        if spec.base is None:
            raise ValueError("base: required; the dense checkpoint directory to upcycle (--base DIR)")
        if spec.router.init == "prototype":
            raise ValueError(
                "router.init=prototype needs forward passes, which conversion avoids: convert with 'normal', then run "
                "`moekit calibrate-router OUT --data FILE`"
            )
        if spec.router.init not in ("normal", "zeros"):
            raise ValueError(
                f"router.init={spec.router.init!r} is a plug-in that works on the model in memory; use moekit.upcycle() "
                "or convert with 'normal' and re-initialise the router after moekit.load()"
            )
        self.spec = spec
        self.base_dir = Path(spec.base)
        self.base = CheckpointReader(self.base_dir, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
        self.config = read_config(self.base_dir)
        self.dense = meta_model(self.config)
        check_config_matches(self.dense, self.base, self.config, self.base_dir)
        self.adapter: ArchAdapter = resolve_arch(self.dense, spec.arch)
        if self.adapter.inline and spec.shared_expert:
            raise ValueError(
                f"{self.adapter.model_type}: its FFN is inline in the layer, which moekit upcycles without a shared expert"
            )
        self.layers = resolve_layers(spec.layers, self.adapter.num_layers)
        self.names = KeyNames(self.dense)
        # On the meta device the projections' names chose the gate order; the first layer's real FFN settles it.
        self.adapter = self.adapter.settled_on(self.dense_ffn(self.layers[0]), self.config)
        self.base_source = CheckpointSource(self.base, self.names, self.adapter, f"base ({self.base_dir})")
        self.dtype = dtype
        self.base_layout = {layer: self.base_source.layout(layer) for layer in self.layers}
        self.sources = [self._source(i, allow_pickle) for i in range(len(spec.experts))]
        self.inits = plugin_expert_inits(spec)
        self.replaced = {k for layer in self.layers for g in self.base_source.ffn_keys(layer).values() for k in g}
        self.all_ffn_keys = {
            k
            for layer in range(self.adapter.num_layers)
            for g in self.base_source.ffn_keys(layer, required=False).values()
            for k in g
        }

    def dense_ffn(self, layer: int) -> torch.nn.Module:
        """Layer `layer`'s dense FFN as a real module with the base checkpoint's weights (for the probes)."""
        meta = self.adapter.ffn_module(self.dense, layer)
        prefix = self.adapter.ffn_prefix(layer)
        state = {}
        names = list(meta.state_dict())
        for name in names:
            key = self.names.find(f"{prefix}.{name}", self.base)
            if key is None:
                raise CheckpointError(f"base ({self.base_dir}): no tensor for {prefix}.{name}")
            state[name] = self.base.get(key)
            siblings = [f"{prefix}.{n}" for n in names if self.names.find(f"{prefix}.{n}", self.base) == key]
            order = self.names.merged(siblings)
            if order is not None:  # saved merged with its siblings (a fused gate_up): its own chunk
                state[name] = state[name].chunk(len(order), 0)[order.index(f"{prefix}.{name}")]
        dtype = next(iter(state.values())).dtype
        # The checkpoint's memory-mapped tensors become the module's weights: nothing is allocated and copied per
        # layer (a fresh fp32 FFN, then its cast, then the copy: ~0.25 GB of zeroed pages per 1.5B-class layer).
        ffn = copy.deepcopy(meta)
        ffn.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()}, assign=True)
        return ffn

    def _source(self, index: int, allow_pickle: bool):
        expert = self.spec.experts[index]
        if expert.source == "base":
            return None
        source = checkpoint_source(
            expert.source, self.adapter, expert.name, self.names, self.base_source, expert.lora_scale, allow_pickle
        )
        source.reader.allow_nonfinite = self.base.allow_nonfinite
        if isinstance(source, LoraSource):
            source.check(self.layers, lambda layer: self.base_layout[layer])
            return source
        self._check_family(Path(expert.source), expert.name)
        for layer in self.layers:
            layout = source.layout(layer)
            for name, (shape, dtype) in self.base_layout[layer].items():
                if name not in layout:
                    raise CheckpointError(f"{source.description}: layer {layer} has no FFN {name} tensor")
                got_shape, got_dtype = layout[name]
                if got_shape != shape:
                    raise CheckpointError(
                        f"{source.description}: layer {layer} FFN {name} has shape {got_shape}, the base has {shape}; "
                        "a specialist must be a copy of the same base model"
                    )
                if got_dtype != dtype and self.dtype is None:
                    raise CheckpointError(
                        f"{source.description}: layer {layer} FFN {name} is {got_dtype}, the base is {dtype}; "
                        "pass --dtype to cast every tensor to one dtype"
                    )
        return source

    def _check_family(self, path: Path, name: str) -> None:
        config_file = path / "config.json"
        if not config_file.is_file():
            return
        other = read_config(path)
        mine = self.config.get_text_config()
        theirs = other.get_text_config()
        if other.model_type != self.config.model_type or theirs.num_hidden_layers != mine.num_hidden_layers:
            raise CheckpointError(
                f"expert {name!r} ({path}): a {other.model_type} with {theirs.num_hidden_layers} layers, the base is a "
                f"{self.config.model_type} with {mine.num_hidden_layers}; specialists must be copies of the same base"
            )

    def full_specialists(self) -> list[tuple[str, CheckpointSource]]:
        out = []
        for expert, source in zip(self.spec.experts, self.sources):
            if isinstance(source, CheckpointSource) and any(k not in self.all_ffn_keys for k in source.reader.keys()):
                out.append((expert.name, source))
        return out

    def out_dtype(self, key: str, reader: CheckpointReader | None = None) -> torch.dtype:
        if self.dtype is not None and (reader or self.base).dtype(key).startswith(("float", "bfloat")):
            return self.dtype
        return getattr(torch, (reader or self.base).dtype(key))


def compare_non_expert(plan: _Plan) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Largest |specialist - base| per tensor group for each full-checkpoint specialist's non-FFN tensors."""
    divergence: dict[str, dict[str, float]] = {}
    notes = []
    for name, source in plan.full_specialists():
        groups: dict[str, float] = defaultdict(float)
        for key in plan.base.keys():
            if key in plan.all_ffn_keys or key not in source.reader:
                continue
            if source.reader.shape(key) != plan.base.shape(key):
                raise CheckpointError(
                    f"expert {name!r}: {key} has shape {source.reader.shape(key)}, the base has {plan.base.shape(key)}"
                )
            a, b = plan.base.get(key), source.reader.get(key)
            diff = 0.0 if torch.equal(a, b) else (a.float() - b.float()).abs().max().item()
            groups[_group(key)] = max(groups[_group(key)], diff)
        divergence[name] = dict(groups)
        changed = {g: d for g, d in groups.items() if d > 0}
        if changed:
            worst = max(changed, key=changed.get)
            what = "dropped (non_expert: base)" if plan.spec.non_expert == "base" else "averaged (non_expert: average)"
            notes.append(
                f"expert {name!r} changed {len(changed)} non-FFN tensor group(s) relative to the base (largest: {worst} "
                f"by {changed[worst]:.3g}); an FFN-only specialist should not. Those changes are {what}."
            )
    return divergence, notes


def _planned_tensors(plan: _Plan) -> tuple[list[PlannedTensor], dict[int, list[str]]]:
    spec, adapter, base = plan.spec, plan.adapter, plan.base
    tensors: list[PlannedTensor] = []
    layer_keys: dict[int, list[str]] = defaultdict(list)
    full = plan.full_specialists() if spec.non_expert == "average" else []
    cache: dict[int, dict[str, torch.Tensor]] = {}
    buffers: dict[str, torch.Tensor] = {}  # expert stacks, reused from layer to layer
    scratch: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)  # each source's joined gate|up, likewise
    ffn_prefix, moe_prefix, layer_prefix = {}, {}, {}  # as the checkpoint names them
    for layer in plan.layers:
        down_key = plan.base_source.ffn_keys(layer)["down"][0]
        ffn_prefix[layer] = down_key.rsplit(".", 2)[0]  # <...>.mlp, or the layer itself for an inline FFN
        moe_prefix[layer] = f"{ffn_prefix[layer]}.{adapter.mlp}" if adapter.inline else ffn_prefix[layer]
        layer_prefix[layer] = ffn_prefix[layer] if adapter.inline else ffn_prefix[layer].rsplit(".", 1)[0]
    emitted = set()

    def fused(layer: int, name: str) -> torch.Tensor:
        # One MoE layer's experts are built once, kept until all their tensors are written, then dropped.
        if layer not in cache:
            cache.clear()
            # The sources' results are stacked (copied) below, so their buffers are free again for the next layer.
            base_tensors = plan.base_source.tensors(layer, scratch[-1])
            per_expert = [
                expert_tensors(
                    spec,
                    i,
                    layer,
                    base_tensors if s is None else s.tensors(layer, scratch[i]),
                    adapter.ffn.gated,
                    plan.inits[i],
                )
                for i, s in enumerate(plan.sources)
            ]
            cache[layer] = {k: _stack([e[k].to(base_tensors[k].dtype) for e in per_expert], k) for k in per_expert[0]}
        return cache[layer][name]

    def _stack(parts: list[torch.Tensor], name: str) -> torch.Tensor:
        # The MoE layers' stacks share their shapes: one buffer per tensor name, refilled once the previous layer's
        # stack has been written (write_shard writes each tensor before producing the next). A fresh 0.3 GB
        # allocation per layer cost a page fault and a zeroed page per 4 KB: half the conversion's minor faults.
        return torch.stack(parts, out=kept_buffer(buffers, name, (len(parts), *parts[0].shape), parts[0].dtype))

    def moe_tensors(layer: int) -> list[PlannedTensor]:
        prefix = moe_prefix[layer]
        layout = plan.base_layout[layer]
        up_name = "gate_up_proj" if adapter.ffn.gated else "up_proj"
        dtype_of = {n: (plan.dtype or getattr(torch, d)) for n, (_, d) in layout.items()}
        experts = spec.num_experts
        out = [
            PlannedTensor(
                f"{prefix}.gate.weight",
                (experts, adapter.hidden_size),
                dtype_of["down"],
                lambda layer=layer: router_weight(spec, layer, adapter.hidden_size).to(dtype_of["down"]),
            ),
            PlannedTensor(
                f"{prefix}.experts.{up_name}",
                (experts, *layout["up"][0]),
                dtype_of["up"],
                lambda layer=layer: fused(layer, "up").to(dtype_of["up"]),
            ),
            PlannedTensor(
                f"{prefix}.experts.down_proj",
                (experts, *layout["down"][0]),
                dtype_of["down"],
                lambda layer=layer: fused(layer, "down").to(dtype_of["down"]),
            ),
        ]
        for bias, attr in (("up_bias", f"{up_name}_bias"), ("down_bias", "down_proj_bias")):
            if adapter.biased:
                shape = (
                    layout[bias][0]
                    if bias in layout
                    else ((layout["up"] if bias == "up_bias" else layout["down"])[0][0],)
                )
                dt = dtype_of.get(bias, dtype_of["down"])
                out.append(
                    PlannedTensor(
                        f"{prefix}.experts.{attr}",
                        (experts, *shape),
                        dt,
                        lambda layer=layer, bias=bias, shape=shape, dt=dt: _bias(fused, layer, bias, experts, shape).to(
                            dt
                        ),
                    )
                )
        if spec.shared_expert:
            for key in plan.base_source.ffn_keys(layer).values():
                for k in key:
                    tail = k[len(prefix) + 1 :]
                    out.append(
                        PlannedTensor(
                            f"{prefix}.shared_expert.expert.{tail}",
                            base.shape(k),
                            plan.out_dtype(k),
                            lambda k=k: base.get(k).to(plan.out_dtype(k)),
                        )
                    )
            out.append(
                PlannedTensor(
                    f"{prefix}.shared_expert.gate.weight",
                    (1, adapter.hidden_size),
                    dtype_of["down"],
                    lambda: torch.zeros(1, adapter.hidden_size, dtype=dtype_of["down"]),
                )
            )
        if layer == plan.layers[0]:
            first = adapter.ffn.gate or adapter.ffn.up
            out.append(
                PlannedTensor(
                    f"{ffn_prefix[layer]}.{first}.weight",
                    (0,),
                    dtype_of["down"],
                    lambda: torch.zeros(0, dtype=dtype_of["down"]),
                )
            )
        return out

    layer_of = {k: layer for layer in plan.layers for g in plan.base_source.ffn_keys(layer).values() for k in g}
    inner = () if adapter.inline else tuple(f"{ffn_prefix[layer]}." for layer in plan.layers)
    first = plan.layers[0]
    decoder = re.compile(re.escape(layer_prefix[first].rsplit(f".{first}", 1)[0]) + r"\.(\d+)\.")
    for key in sorted(base.keys(), key=_natural):
        if key in plan.replaced:
            layer = layer_of[key]
            if layer not in emitted:
                emitted.add(layer)
                for planned in moe_tensors(layer):
                    tensors.append(planned)
                    layer_keys[layer].append(planned.key)
            continue
        dtype = plan.out_dtype(key)
        out_key = key
        owner = next((p for p in inner if key.startswith(p)), None) if inner else None
        if owner is not None:  # the FFN's own state beyond its projections (xIELU's alphas) moves into the experts
            out_key = f"{owner}experts.{key[len(owner) :]}"
        if full and key not in plan.all_ffn_keys:
            producer = lambda key=key, dtype=dtype: _average(key, base, [s.reader for _, s in full]).to(dtype)
        else:
            producer = lambda key=key, dtype=dtype: base.get(key).to(dtype)
        tensors.append(PlannedTensor(out_key, base.shape(key), dtype, producer))
        match = decoder.match(key)
        if match:
            layer_keys[int(match.group(1))].append(key)
    return tensors, layer_keys


def _bias(fused, layer: int, name: str, experts: int, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        return fused(layer, name)
    except KeyError:  # the dense FFN has no bias here: zeros keep the function
        return torch.zeros(experts, *shape)


def _average(key: str, base: CheckpointReader, others: list[CheckpointReader]) -> torch.Tensor:
    tensors = [base.get(key).float()] + [r.get(key).float() for r in others if key in r]
    return torch.stack(tensors).mean(0)


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _check_complete(plan: _Plan, planned: list[PlannedTensor], record: MoeRecord) -> None:
    """Every parameter and persistent buffer of the MoE model must be in the plan (tied aliases excepted)."""
    config_cls, _ = moekit_classes(plan.adapter.model_type, plan.adapter.model_class)
    config = read_config(plan.base_dir)
    config.__class__ = config_cls
    config.moekit = record.to_json()
    model = meta_model(config)
    names = KeyNames(model)
    planned_keys = {t.key for t in planned}
    expected = [n for n, _ in model.named_parameters()]
    missing = [n for n in expected if not any(c in planned_keys for c in names.candidates(n))]
    tied = set()
    if getattr(plan.config.get_text_config(), "tie_word_embeddings", False) or getattr(
        plan.config, "tie_word_embeddings", False
    ):
        tied = {n for n in missing if n.endswith("lm_head.weight")}
    missing = [n for n in missing if n not in tied]
    if missing:
        raise CheckpointError(f"{plan.base_dir}: the base checkpoint lacks tensors the model needs: {missing[:8]}")


def _provenance(plan: _Plan, spec: UpcycleSpec, sources: dict[str, Any], tmp: Path) -> Provenance:
    """The output's `moekit.json`; the position encoders saved with the base travel with it (weights into `tmp`,
    the folder being written, and refs)."""
    encoders = []
    base = read_provenance(plan.base_dir)
    if base is not None and base.position_encoders:
        encoders = base.position_encoders
        if (plan.base_dir / ENCODERS_FILE).is_file():
            shutil.copy2(plan.base_dir / ENCODERS_FILE, tmp / ENCODERS_FILE)
    return Provenance(
        made_by="moekit upcycle",
        spec=spec.model_dump(mode="json"),
        sources=sources,
        moe_layers=plan.layers,
        position_encoders=encoders,
    )


def convert(
    spec: UpcycleSpec,
    output: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    compare: bool = True,
    max_shard_bytes: int = 4 * 1024**3,
    allow_nonfinite: bool = False,
) -> ConversionReport:
    """Upcycle the checkpoint `spec.base` into an MoE checkpoint at `output`, streaming shard by shard."""
    start = time.perf_counter()
    output = Path(output)
    check_apart(output, spec.input_paths)
    if not overwrite and is_nonempty_dir(output):
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")
    plan = _Plan(spec, allow_pickle, dtype, allow_nonfinite)
    report = ConversionReport(output, moe_layers=plan.layers)
    if compare:
        report.divergence, report.warnings = compare_non_expert(plan)
    sources = {"base": {"path": str(plan.base_dir.resolve()), "fingerprint": plan.base.fingerprint()}}
    for expert, source in zip(spec.experts, plan.sources):
        if source is not None:
            reader = source.reader
            kind = (
                "lora"
                if isinstance(source, LoraSource)
                else ("full" if any(k not in plan.all_ffn_keys for k in reader.keys()) else "ffn_only")
            )
            sources[expert.name] = {
                "path": str(Path(expert.source).resolve()),
                "kind": kind,
                "fingerprint": reader.fingerprint(),
            }
    record = build_record(spec, plan.adapter, plan.layers, sources)
    for layer in plan.layers:  # function preservation on every layer to write, before the first byte
        check_layer(plan.dense_ffn(layer), plan.adapter, record, layer)
    planned, layer_keys = _planned_tensors(plan)
    _check_complete(plan, planned, record)
    shards = plan_shards(planned, max_shard_bytes)
    total = sum(s.nbytes for s in shards)
    free = shutil.disk_usage(output.parent if output.parent.exists() else Path.cwd()).free
    if total > free:
        raise OSError(f"not enough disk space for {output}: needs {total / 1e9:.2f} GB, {free / 1e9:.2f} GB free")
    config_cls, model_cls = moekit_classes(plan.adapter.model_type, plan.adapter.model_class)
    for warning in report.warnings:
        warnings.warn(warning, stacklevel=2)
    with (
        atomic_dir(output, overwrite=overwrite) as tmp,
        ConversionProgress(total, plan.adapter.num_layers, layer_keys, enabled=progress) as bar,
    ):
        for shard in shards:
            write_shard(tmp / shard.name, shard, {"format": "pt"}, on_tensor=bar.advance)
        write_index(tmp, shards)
        config = plan.config
        config.__class__ = config_cls
        config.moekit = record.to_json()
        config.architectures = [model_cls.__name__]
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(tmp)
        copy_side_files(plan.base_dir, tmp, ("config.json", *PROVENANCE_FILES))
        write_provenance(tmp, _provenance(plan, spec, sources, tmp))
    report.bytes_written = total
    report.seconds = time.perf_counter() - start
    return report
