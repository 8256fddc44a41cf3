"""`moekit export --native`: rewrite a moekit checkpoint as transformers' stock MoE twin of its family.

The files follow the layout of the twin's released checkpoints (per-expert or fused tensors, their names and
shapes, `moekit.upcycle.twins`), written by moekit itself, so serving engines that read those layouts (vLLM,
SGLang, llama.cpp) load them, and stock transformers loads them without moekit. The config carries the keys of
transformers 5 and the older names transformers 4.57 reads (`rope_theta`, `rope_scaling`, `num_experts`, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedConfig

from moekit.arch import ArchAdapter
from moekit.arch.detect import text_config
from moekit.config.provenance import PROVENANCE_FILES, Provenance, read_provenance, write_provenance
from moekit.config.record import MoeRecord
from moekit.io.atomic import atomic_dir, is_nonempty_dir
from moekit.io.files import copy_side_files
from moekit.io.names import KeyNames
from moekit.io.overlap import check_apart
from moekit.io.progress import ConversionProgress
from moekit.io.reader import CheckpointReader
from moekit.io.writer import PlannedTensor, plan_shards, write_index, write_shard
from moekit.modeling.load import read_record
from moekit.modeling.meta_model import meta_model, read_config
from moekit.upcycle.checks import check_config_matches
from moekit.upcycle.twins import REFUSED, TWINS, Twin, expert_shapes, expert_tensors, sparsity_keys, twin_for

DROP_KEYS = ("model_type", "architectures", "moekit", "transformers_version", "auto_map", "_name_or_path")


class ExportError(ValueError):
    """The checkpoint has no stock twin or a layout the twin cannot express; the message says what to change."""


def supported() -> str:
    """What each dense family can become, for `--list` and error messages."""
    rows = [f"{', '.join(t.sources)} -> {t.model_type}" for t in TWINS.values()]
    return "; ".join(rows)


def _fields(config: PreTrainedConfig) -> dict[str, Any]:
    data = config.to_dict()
    empty = {k for k, v in data.items() if v is None and k == "quantization_config"}  # 4.57 reads null as a config
    return {k: v for k, v in data.items() if k not in DROP_KEYS and k not in empty and not k.startswith("_")}


def _check(record: MoeRecord, source: Path) -> Twin:
    if (source / "adapter_config.json").is_file():
        raise ExportError(f"{source} is a LoRA adapter, not a model: merge it first (a stage with `save: full`)")
    twin = twin_for(record.base_model_type)
    if twin is None:
        reason = REFUSED.get(record.base_model_type) or "transformers has no MoE class with this family's layers"
        raise ExportError(
            f"{record.base_model_type} has no stock MoE twin: {reason}. Only moekit loads it (moekit.load). "
            f"Exportable: {supported()}"
        )
    if record.biased or record.arch.ffn.kind != "gated":
        raise ExportError(
            f"{twin.model_type} experts are bias-free SwiGLU; this checkpoint's FFN is {record.arch.ffn.kind} with "
            f"biases={record.biased}"
        )
    if record.shared_expert and twin.shared == "none":
        raise ExportError(
            f"{twin.model_type} has no shared expert; this checkpoint has one. Upcycle without shared_expert to export"
        )
    return twin


def native_config(config: PreTrainedConfig, record: MoeRecord, twin: Twin) -> PreTrainedConfig:
    """The stock twin's config for a moekit config (ExportError when the layers cannot be expressed)."""
    try:
        moe = sparsity_keys(twin, record)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    experts, per_token, width = twin.keys
    moe.update({experts: record.num_experts, per_token: record.top_k, "intermediate_size": record.intermediate_size})
    if width is not None:
        moe[width] = record.intermediate_size
    if twin.shared == "sigmoid":
        moe["shared_expert_intermediate_size"] = record.intermediate_size
    if twin.shared == "average":
        moe.update(num_shared_experts=int(record.shared_expert), shared_expert_combination_strategy="average")
    moe.update(twin.config, router_aux_loss_coef=record.aux_loss_coef)
    if not twin.text_config:
        text = _fields(config)
        if text.get("attention_bias") and twin.model_type in ("mixtral", "flex_olmo"):
            raise ExportError(f"{twin.model_type} has no attention biases; this {config.model_type} config uses them")
        for key in ("mlp_bias", "pretraining_tp"):
            text.pop(key, None)
        return AutoConfig.for_model(twin.model_type, **{**text, **moe})
    text = {**_fields(config.text_config), **moe}
    vision = _fields(config.vision_config)
    top = {k: v for k, v in _fields(config).items() if k not in ("text_config", "vision_config")}
    return AutoConfig.for_model(twin.model_type, text_config=text, vision_config=vision, **top)


def legacy_keys(data: dict[str, Any], twin: Twin) -> dict[str, Any]:
    """Add the config keys transformers 4.57 reads where 5.x renamed them (5.x reads the file the same)."""
    rope = data.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        data.setdefault("rope_theta", rope["rope_theta"])
        rest = {k: v for k, v in rope.items() if k != "rope_theta"}
        data.setdefault("rope_scaling", None if rest in ({}, {"rope_type": "default"}) else rest)
    if "num_local_experts" in data and "num_experts" not in data:
        data["num_experts"] = data["num_local_experts"]
    if "num_experts" in data and twin.keys[0] == "num_experts":
        data.setdefault("num_local_experts", data["num_experts"])
    if "norm_topk_prob" in twin.config:
        data["norm_topk_prob"] = twin.config["norm_topk_prob"]
    return data


def _write_config(target: PreTrainedConfig, twin: Twin, folder: Path) -> None:
    target.save_pretrained(folder)
    file = folder / "config.json"
    data = json.loads(file.read_text())
    data = legacy_keys(data, twin)
    if twin.text_config:
        data["text_config"] = legacy_keys(data["text_config"], twin)
        data["text_config"].setdefault("tie_word_embeddings", data.get("tie_word_embeddings", False))
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class _Layers:
    """The MoE tensors of one layer in the twin's layout, built on first use and kept until the next layer."""

    def __init__(self, reader: CheckpointReader, names: KeyNames, adapter: ArchAdapter, record: MoeRecord, twin: Twin):
        self.reader, self.names, self.adapter, self.record, self.twin = reader, names, adapter, record, twin
        self.cache: dict[int, dict[str, torch.Tensor]] = {}

    def load(self, key: str) -> torch.Tensor:
        found = self.names.find(key, self.reader)
        if found is None:
            raise ExportError(f"{self.reader.path}: no tensor for {key}")
        return self.reader.get(found)

    def prefix(self, layer: int) -> str:
        return f"{self.adapter.layers}.{layer}.{self.twin.moe}"

    def ours(self, layer: int) -> str:
        return self.adapter.ffn_prefix(layer)

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self.cache:
            self.cache.clear()
            self.cache[layer] = self._build(layer)
        return self.cache[layer]

    def _build(self, layer: int) -> dict[str, torch.Tensor]:
        ours, prefix, twin = self.ours(layer), self.prefix(layer), self.twin
        up, down = self.load(f"{ours}.experts.gate_up_proj"), self.load(f"{ours}.experts.down_proj")
        out = {f"{prefix}.{twin.router}": self.load(f"{ours}.gate.weight")}
        if twin.shared == "sigmoid":
            shared, down = self._shared(layer, down)
            out.update(shared)
        elif twin.shared == "average" and self.record.shared_expert:
            out.update(self._average_shared(layer))
        out.update(expert_tensors(twin, prefix, up, down))
        if twin.extra is not None:
            out.update(twin.extra(prefix, self.record.num_experts))
        return out

    def _shared(self, layer: int, down: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Qwen-style shared expert `sigmoid(gate(x)) * shared(x)` added to the routed output. moekit's mix is
        `(1 - s) * routed + s * shared` with s = sigmoid(its gate): equal when its gate is zero (s = 0.5) and the
        routed down projections are halved. Without a moekit shared expert, a zero one adds exactly nothing."""
        prefix, hidden = self.prefix(layer), self.record.hidden_size
        width = self.record.intermediate_size
        dtype = down.dtype
        names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        if not self.record.shared_expert:
            zeros = {
                "gate": torch.zeros(width, hidden, dtype=dtype),
                "up": torch.zeros(width, hidden, dtype=dtype),
                "down": torch.zeros(hidden, width, dtype=dtype),
            }
            out = {f"{prefix}.shared_expert.{names[k]}.weight": v for k, v in zeros.items()}
            out[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, hidden, dtype=dtype)
            return out, down
        gate = self._untrained_shared_gate(layer, "sigmoid(gate) * shared(x)")
        out = {f"{prefix}.shared_expert.{k}": v for k, v in self._shared_weights(layer).items()}
        out[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, hidden, dtype=gate.dtype)
        return out, down * 0.5

    def _average_shared(self, layer: int) -> dict[str, torch.Tensor]:
        """Cohere2-MoE's `average` shared expert, `(routed + shared) / 2`: moekit's mix while its gate is zero."""
        self._untrained_shared_gate(layer, "(routed + shared) / 2")
        return {f"{self.prefix(layer)}.shared_experts.{k}": v for k, v in self._shared_weights(layer).items()}

    def _untrained_shared_gate(self, layer: int, twin_mix: str) -> torch.Tensor:
        gate = self.load(f"{self.ours(layer)}.shared_expert.gate.weight")
        if bool(gate.ne(0).any()):
            raise ExportError(
                f"layer {layer}: the shared expert's gate was trained (non-zero); {self.twin.model_type} computes "
                f"{twin_mix} and cannot express moekit's convex mix then. Keep the moekit checkpoint (served by "
                "transformers after `import moekit`, or by vLLM with plugins/moekit-vllm for Qwen2 / Qwen2.5-VL)"
            )
        return gate

    def _shared_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """moekit's shared expert as `{gate,up,down}_proj.weight`."""
        ffn, ours = self.adapter.ffn, self.ours(layer)
        roles = {"gate_proj": ffn.gate, "up_proj": ffn.up, "down_proj": ffn.down}
        return {f"{k}.weight": self.load(f"{ours}.shared_expert.expert.{v}.weight") for k, v in roles.items()}


def export_native(
    source: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = 4 * 1024**3,
    allow_nonfinite: bool = False,
) -> Path:
    """Write the stock-twin checkpoint of the moekit checkpoint `source` to `output` (atomically); a tensor with
    NaN/Inf stops it (naming the tensor and file) unless `allow_nonfinite`."""
    source, output = Path(source), Path(output)
    check_apart(output, {"the source": source})
    if (source / "adapter_config.json").is_file() and not (source / "config.json").is_file():
        raise ExportError(f"{source} is a LoRA adapter, not a model: merge it first (a stage with `save: full`)")
    record = read_record(source)
    twin = _check(record, source)
    config = read_config(source)
    target = native_config(config, record, twin)
    if not overwrite and is_nonempty_dir(output):
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")
    reader = CheckpointReader(source, allow_nonfinite=allow_nonfinite)
    ours = meta_model(config)
    check_config_matches(ours, reader, config, source)
    stock = meta_model(target)
    adapter = ArchAdapter.from_record(record)
    names = KeyNames(ours)
    layers = _Layers(reader, names, adapter, record, twin)
    moe_modules = {f"{adapter.layers}.{i}.{_moe_attr(stock, adapter, i)}." for i in record.layers}
    tied = getattr(text_config(target), "tie_word_embeddings", False) or getattr(target, "tie_word_embeddings", False)
    ours_params = dict(ours.named_parameters())
    planned: list[PlannedTensor] = []
    for name, param in stock.named_parameters():
        if any(name.startswith(m) for m in moe_modules):
            continue
        if name.endswith("lm_head.weight") and tied and names.find(name, reader) is None:
            continue
        if name not in ours_params or tuple(ours_params[name].shape) != tuple(param.shape):
            raise ExportError(f"internal: {name} {tuple(param.shape)} of {type(stock).__name__} has no counterpart")
        key = names.find(name, reader)
        if key is None:
            raise ExportError(f"{source}: no tensor for {name}")
        dtype = getattr(torch, reader.dtype(key))
        planned.append(PlannedTensor(name, tuple(param.shape), dtype, lambda key=key: reader.get(key)))
    dtype = getattr(
        torch, reader.dtype(names.find(f"{adapter.ffn_prefix(record.layers[0])}.experts.down_proj", reader))
    )
    for layer in record.layers:
        for key, shape, kind in _layer_plan(layers, layer, stock, dtype):
            planned.append(PlannedTensor(key, shape, kind, lambda layer=layer, key=key: layers.tensors(layer)[key]))
    shards = plan_shards(planned, max_shard_bytes)
    total = sum(s.nbytes for s in shards)
    with (
        atomic_dir(output, overwrite=overwrite) as tmp,
        ConversionProgress(total, record.num_layers, {}, enabled=progress) as bar,
    ):
        for shard in shards:
            write_shard(tmp / shard.name, shard, {"format": "pt"}, on_tensor=bar.advance)
        write_index(tmp, shards)
        target.architectures = [type(stock).__name__]
        _write_config(target, twin, tmp)
        copy_side_files(source, tmp, ("config.json", *PROVENANCE_FILES))
        made = read_provenance(source)
        write_provenance(
            tmp,
            Provenance(
                made_by="moekit export --native",
                spec=made.spec if made and made.spec else record.spec,
                sources=made.sources if made and made.sources else record.sources,
                moe_layers=record.layers,
                params={"source": str(source.resolve()), "target": twin.model_type, "layout": twin.released},
            ),
        )
    return output


def _moe_attr(stock: torch.nn.Module, adapter: ArchAdapter, layer: int) -> str:
    """The stock layer's attribute holding its MoE block (the child with experts)."""
    module = stock.get_submodule(adapter.layers)[layer]
    for name, child in module.named_children():
        if hasattr(child, "experts"):
            return name
    raise ExportError(f"internal: layer {layer} of {type(stock).__name__} has no MoE block")


def _layer_plan(layers: _Layers, layer: int, stock: torch.nn.Module, dtype: torch.dtype) -> list[tuple]:
    """(name, shape, dtype) of every tensor the layer's MoE block is written as, without reading weights."""
    record, twin, prefix = layers.record, layers.twin, layers.prefix(layer)
    hidden, width, experts = record.hidden_size, record.intermediate_size, record.num_experts
    out = [(f"{prefix}.{twin.router}", (experts, hidden), dtype)]
    if twin.shared == "sigmoid":
        for proj, shape in (
            ("gate_proj", (width, hidden)),
            ("up_proj", (width, hidden)),
            ("down_proj", (hidden, width)),
        ):
            out.append((f"{prefix}.shared_expert.{proj}.weight", shape, dtype))
        out.append((f"{prefix}.shared_expert_gate.weight", (1, hidden), dtype))
    if twin.shared == "average" and record.shared_expert:
        for proj, shape in (
            ("gate_proj", (width, hidden)),
            ("up_proj", (width, hidden)),
            ("down_proj", (hidden, width)),
        ):
            out.append((f"{prefix}.shared_experts.{proj}.weight", shape, dtype))
    out += [(k, s, dtype) for k, s in expert_shapes(twin, prefix, experts, hidden, width).items()]
    if twin.extra is not None:
        out += [(k, tuple(v.shape), v.dtype) for k, v in twin.extra(prefix, experts).items()]
    return out
