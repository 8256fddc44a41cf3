"""`moekit export --native`: rewrite a moekit checkpoint as transformers' stock MoE twin of its family.

Stock classes load the result without moekit (and vLLM / SGLang can serve it). The on-disk layout of the twin
(per-expert keys for Mixtral and Qwen3-MoE, transposed fused experts for Qwen3-VL-MoE) comes from
transformers' own reverse weight conversion, so moekit keeps no second copy of those formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, revert_weight_conversion

from moekit.config.provenance import PROVENANCE_FILES, Provenance, read_provenance, write_provenance
from moekit.config.record import MoeRecord
from moekit.io.atomic import atomic_dir, is_nonempty_dir
from moekit.io.files import copy_side_files
from moekit.io.names import KeyNames, _Probe
from moekit.io.progress import ConversionProgress
from moekit.io.reader import CheckpointReader
from moekit.io.writer import PlannedTensor, plan_shards, write_index, write_shard
from moekit.modeling.load import read_record
from moekit.modeling.meta_model import meta_model, read_config

TWINS = {"qwen3_vl": "qwen3_vl_moe", "qwen3": "qwen3_moe", "llama": "mixtral", "mistral": "mixtral"}
SUPPORTED = (
    "qwen3_vl -> qwen3_vl_moe (any layer layout), qwen3 -> qwen3_moe (any layer layout), "
    "llama / mistral -> mixtral (every layer MoE: --layers full); all without shared expert or FFN biases"
)
DROP_KEYS = ("model_type", "architectures", "moekit", "transformers_version", "auto_map", "_name_or_path")


class ExportError(ValueError):
    """The checkpoint has no stock twin; the message says why and which layouts would work."""


def sparse_layout(moe_layers: list[int], num_layers: int) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) of Qwen3-(VL-)MoE that make exactly `moe_layers` sparse.

    A layer is sparse there when `idx not in mlp_only_layers and (idx + 1) % step == 0`.
    """
    wanted = set(moe_layers)
    for step in range(2, num_layers + 1):
        if wanted == {i for i in range(num_layers) if (i + 1) % step == 0}:
            return step, []
    return 1, [i for i in range(num_layers) if i not in wanted]


def _text_fields(config: PreTrainedConfig) -> dict[str, Any]:
    data = config.to_dict()
    return {k: v for k, v in data.items() if k not in DROP_KEYS and not k.startswith("_")}


def native_config(config: PreTrainedConfig, record: MoeRecord) -> PreTrainedConfig:
    """The stock twin's config for a moekit config (raises ExportError when there is none)."""
    base = record.base_model_type
    twin = TWINS.get(base)
    if twin is None:
        raise ExportError(
            f"{base} has no stock MoE twin in transformers, so only moekit can load it (moekit.load). Exportable: {SUPPORTED}"
        )
    if record.shared_expert:
        raise ExportError(f"{twin} has no shared expert; this checkpoint has one. Exportable: {SUPPORTED}")
    if record.biased or record.arch.ffn.kind != "gated":
        raise ExportError(
            f"{twin} experts are bias-free SwiGLU; this checkpoint's FFN is {record.arch.ffn.kind} with "
            f"biases={record.biased}"
        )
    num_layers, layers = record.num_layers, record.layers
    moe = {"num_experts_per_tok": record.top_k}
    if twin == "mixtral":
        if layers != list(range(num_layers)):
            raise ExportError(
                f"mixtral makes every decoder layer MoE; this checkpoint has MoE layers {layers} of {num_layers}. "
                f"Upcycle with --layers full to export, or keep the moekit checkpoint. Exportable: {SUPPORTED}"
            )
        text = _text_fields(config)
        if text.get("attention_bias") or text.get("mlp_bias"):
            raise ExportError("mixtral has no attention or MLP biases; this llama config uses them")
        text.update(
            moe,
            num_local_experts=record.num_experts,
            intermediate_size=record.intermediate_size,
            router_aux_loss_coef=record.aux_loss_coef,
        )
        for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
            text.pop(key, None)
        return AutoConfig.for_model("mixtral", **text)
    step, mlp_only = sparse_layout(layers, num_layers)
    moe.update(
        num_experts=record.num_experts,
        moe_intermediate_size=record.intermediate_size,
        decoder_sparse_step=step,
        mlp_only_layers=mlp_only,
        router_aux_loss_coef=record.aux_loss_coef,
    )
    if twin == "qwen3_moe":
        text = _text_fields(config)
        text.update(moe, norm_topk_prob=True)
        return AutoConfig.for_model("qwen3_moe", **text)
    text = _text_fields(config.text_config)
    text.update(moe)
    vision = _text_fields(config.vision_config)
    top = {k: v for k, v in _text_fields(config).items() if k not in ("text_config", "vision_config")}
    return AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=vision, **top)


class _Reverter:
    """transformers' reverse conversion for the stock class, computed once."""

    def __init__(self, model: torch.nn.Module):
        conversions = [
            c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)
        ]
        self.probe = _Probe(model, conversions) if conversions else None

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.probe is None:
            return dict(tensors)
        return revert_weight_conversion(self.probe, dict(tensors))


def export_native(
    source: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Write the stock-twin checkpoint of the moekit checkpoint `source` to `output` (atomically)."""
    source, output = Path(source), Path(output)
    record = read_record(source)
    config = read_config(source)
    target = native_config(config, record)
    if not overwrite and is_nonempty_dir(output):
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")
    reader = CheckpointReader(source)
    ours = meta_model(config)
    stock = meta_model(target)
    our_names = KeyNames(ours)
    revert = _Reverter(stock)
    stock_params = dict(stock.named_parameters())
    groups: dict[str, list[str]] = {}  # one group per MoE layer's experts, converted together
    singles: list[str] = []
    for name, param in ours.named_parameters():
        if name not in stock_params or tuple(stock_params[name].shape) != tuple(param.shape):
            raise ExportError(f"internal: {name} {tuple(param.shape)} has no counterpart in {type(stock).__name__}")
        if ".experts." in name:
            groups.setdefault(name.rsplit(".experts.", 1)[0], []).append(name)
        else:
            singles.append(name)
    tied = {
        n
        for n in singles
        if our_names.find(n, reader) is None
        and n.endswith("lm_head.weight")
        and config.get_text_config().tie_word_embeddings
    }

    def load(name: str) -> torch.Tensor:
        key = our_names.find(name, reader)
        if key is None:
            raise ExportError(f"{source}: no tensor for {name}")
        return reader.get(key)

    planned: list[PlannedTensor] = []
    for name in singles:
        if name in tied:
            continue
        (out_name,) = revert({name: torch.empty(stock_params[name].shape, device="meta")})
        planned.append(
            PlannedTensor(
                out_name,
                tuple(stock_params[name].shape),
                getattr(torch, reader.dtype(our_names.find(name, reader) or name)),
                lambda name=name: load(name),
            )
        )
    cache: dict[str, dict[str, torch.Tensor]] = {}
    for prefix, names in groups.items():
        dtype = getattr(torch, reader.dtype(our_names.find(names[0], reader)))
        shapes = revert({n: torch.empty(stock_params[n].shape, device="meta", dtype=dtype) for n in names})

        def produce(key: str, prefix=prefix, names=names) -> torch.Tensor:
            if prefix not in cache:
                cache.clear()
                cache[prefix] = revert({n: load(n) for n in names})
            return cache[prefix][key].contiguous()

        for key, tensor in shapes.items():
            planned.append(
                PlannedTensor(key, tuple(tensor.shape), dtype, lambda key=key, produce=produce: produce(key))
            )
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
        target.save_pretrained(tmp)
        copy_side_files(source, tmp, ("config.json", *PROVENANCE_FILES))
        made = read_provenance(source)
        write_provenance(
            tmp,
            Provenance(
                made_by="moekit export --native",
                spec=made.spec if made else record.spec,
                sources=made.sources if made else record.sources,
                moe_layers=record.layers,
                params={"source": str(source.resolve()), "target": target.model_type},
            ),
        )
    return output
