"""transformers' stock MoE twins of dense families, and how their released checkpoints lay out the MoE tensors.

A twin can take a moekit checkpoint only when its routing computes moekit's exactly: softmax over the experts,
top-k, the kept weights renormalised to sum to 1, no router bias (or a zero one). Each `Twin` says which dense
families it serves, which released model its on-disk layout follows, how that layout names and shapes the
router and the experts (moekit writes them itself), which layers it can make sparse, and the config keys.
`REFUSED` explains the families whose MoE relatives route differently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from moekit.config.record import MoeRecord

Experts = Literal["per_expert", "fused", "fused_transposed", "granite"]


@dataclass(frozen=True)
class Twin:
    """A stock MoE class a dense family can be exported to."""

    model_type: str  # the twin's transformers model type
    sources: tuple[str, ...]  # dense model types it serves
    released: str  # the released checkpoint whose tensor layout the export follows
    experts: Experts
    moe: str = "mlp"  # the decoder layer's attribute for the MoE block, as the released files name it
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down
    router: str = "gate.weight"
    sparsity: Literal["every_layer", "qwen", "ernie", "cohere2"] = "every_layer"
    # "sigmoid": the class always has a sigmoid-gated shared expert; "average": an optional one, (routed + shared) / 2
    shared: Literal["none", "sigmoid", "average"] = "none"
    text_config: bool = False  # MoE keys live in `text_config` (a VLM)
    config: dict[str, Any] = field(default_factory=dict)  # fixed keys of the twin's config
    # config keys of: expert count, experts per token, expert width (None: `intermediate_size` is the width)
    keys: tuple[str, str, str | None] = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
    extra: Callable[[str, int], dict[str, torch.Tensor]] | None = None  # tensors the class needs besides experts
    serving: str = ""  # what the serving engines take (docs/serving.md)


def _ernie_statics(prefix: str, experts: int) -> dict[str, torch.Tensor]:
    # ERNIE 4.5 selects experts on probs + this bias; zero keeps moekit's top-k (vLLM requires the tensor).
    return {f"{prefix}.moe_statics.e_score_correction_bias": torch.zeros(1, experts, dtype=torch.float32)}


TWINS: dict[str, Twin] = {
    t.model_type: t
    for t in (
        Twin(
            "qwen2_moe",
            ("qwen2",),
            "Qwen/Qwen1.5-MoE-A2.7B",
            "per_expert",
            sparsity="qwen",
            shared="sigmoid",
            config={"norm_topk_prob": True},
            serving="vLLM (any layer layout); SGLang with every layer MoE; not llama.cpp (it never renormalises)",
        ),
        Twin(
            "qwen3_moe",
            ("qwen3",),
            "Qwen/Qwen3-30B-A3B",
            "per_expert",
            sparsity="qwen",
            config={"norm_topk_prob": True},
            serving="vLLM (any layer layout); SGLang and llama.cpp with every layer MoE",
        ),
        Twin(
            "qwen3_vl_moe",
            ("qwen3_vl",),
            "Qwen/Qwen3-VL-30B-A3B-Instruct",
            "fused_transposed",
            sparsity="qwen",
            text_config=True,
            config={"norm_topk_prob": True},
            serving="vLLM (any layer layout); SGLang and llama.cpp with every layer MoE",
        ),
        Twin(
            "qwen3_5_moe",
            ("qwen3_5",),
            "Qwen/Qwen3.5-35B-A3B",
            "fused",
            shared="sigmoid",
            text_config=True,
            serving="vLLM, SGLang, llama.cpp (every layer MoE; llama.cpp's converter with `--no-mtp`)",
        ),
        Twin(
            "qwen3_5_moe_text",
            ("qwen3_5_text",),
            "Qwen/Qwen3.5-35B-A3B (its language model)",
            "fused",
            shared="sigmoid",
            serving="vLLM, llama.cpp (every layer MoE; llama.cpp's converter with `--no-mtp`)",
        ),
        Twin(
            "mixtral",
            ("llama", "mistral"),
            "mistralai/Mixtral-8x7B-v0.1",
            "per_expert",
            moe="block_sparse_moe",
            expert_names=("w1", "w3", "w2"),
            keys=("num_local_experts", "num_experts_per_tok", None),
            serving="vLLM, SGLang, llama.cpp (every layer MoE)",
        ),
        Twin(
            "granitemoe",
            ("granite",),
            "ibm-granite/granite-3.1-3b-a800m-instruct",
            "granite",
            moe="block_sparse_moe",
            router="router.layer.weight",
            keys=("num_local_experts", "num_experts_per_tok", None),
            serving="vLLM, llama.cpp (every layer MoE)",
        ),
        Twin(
            "ernie4_5_moe",
            ("ernie4_5",),
            "baidu/ERNIE-4.5-21B-A3B-PT",
            "per_expert",
            sparsity="ernie",
            config={"moe_num_shared_experts": 0},
            keys=("moe_num_experts", "moe_k", "moe_intermediate_size"),
            extra=_ernie_statics,
            serving="vLLM (layers start..end every `interval`); llama.cpp with a contiguous MoE suffix",
        ),
        Twin(
            "cohere2_moe",
            ("cohere2",),
            "CohereLabs/North-Mini-Code-1.0",
            "per_expert",
            sparsity="cohere2",
            shared="average",
            config={"expert_selection_fn": "softmax", "norm_topk_prob": True},
            keys=("num_experts", "num_experts_per_tok", None),
            serving="vLLM (any layer layout); llama.cpp with every layer MoE (its converter's own gguf-py)",
        ),
        Twin(
            "flex_olmo",
            ("olmo2",),
            "allenai/FlexOlmo-7x7B-1T",
            "per_expert",
            config={"norm_topk_prob": True},
            keys=("num_experts", "num_experts_per_tok", None),
            serving="vLLM through its Transformers backend; no llama.cpp converter",
        ),
    )
}

REFUSED: dict[str, str] = {
    "glm4v": "GLM-4V-MoE routes with sigmoid scores plus a bias and group-limited top-k, and its decoder layers "
    "have two norms where GLM-4V's have four: no exact twin",
    "glm46v": "GLM-4.6V's MoE relative routes with sigmoid scores plus a bias: no exact twin",
    "qwen2_5_vl": "no stock MoE VLM has Qwen2.5-VL's vision tower with M-RoPE; serve moekit's checkpoint itself "
    "with vLLM and the plugins/moekit-vllm plug-in, or with transformers after `import moekit` (docs/serving.md)",
    "qwen2_vl": "no stock MoE VLM has Qwen2-VL's vision tower",
    "olmo2": "",  # has a twin (flex_olmo); OLMoE is pre-norm and never renormalises
    "gemma3": "Gemma's MoE variants keep the dense MLP beside a normed, scaled router: no exact twin",
}


def twin_for(base_model_type: str) -> Twin | None:
    return next((t for t in TWINS.values() if base_model_type in t.sources), None)


def sparse_layout(moe_layers: list[int], num_layers: int) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) of Qwen2/3(-VL)-MoE that make exactly `moe_layers` sparse.

    A layer is sparse there when `idx not in mlp_only_layers and (idx + 1) % step == 0`.
    """
    wanted = set(moe_layers)
    for step in range(2, num_layers + 1):
        if wanted == {i for i in range(num_layers) if (i + 1) % step == 0}:
            return step, []
    return 1, [i for i in range(num_layers) if i not in wanted]


def ernie_layout(moe_layers: list[int], num_layers: int) -> dict[str, int] | None:
    """ERNIE 4.5 MoE's start / end / interval that make exactly `moe_layers` sparse, or None."""
    for interval in range(1, num_layers + 1):
        for start in range(num_layers):
            for end in range(start, num_layers):
                chosen = [i for i in range(start, end + 1) if (i + 1) % interval == 0]
                if chosen == moe_layers:
                    return {"moe_layer_start_index": start, "moe_layer_end_index": end, "moe_layer_interval": interval}
    return None


def sparsity_keys(twin: Twin, record: MoeRecord) -> dict[str, Any]:
    """The twin's config keys that make exactly the recorded layers sparse; ValueError when it cannot."""
    layers, count = record.layers, record.num_layers
    if twin.sparsity == "every_layer":
        if layers != list(range(count)):
            raise ValueError(
                f"{twin.model_type} makes every decoder layer MoE; this checkpoint has MoE layers {layers} of {count}. "
                "Upcycle with --layers full to export it, or keep the moekit checkpoint"
            )
        return {}
    if twin.sparsity == "cohere2":
        # Dense layers get `prefix_dense_intermediate_size`; a pattern of 1 would force RoPE on dense full-attention
        # layers (Cohere2's have none), so it is 2; the attention layout itself comes with `layer_types`.
        kinds = ["sparse" if i in layers else "dense" for i in range(count)]
        return {
            "mlp_layer_types": kinds,
            "prefix_dense_intermediate_size": record.intermediate_size,
            "prefix_dense_sliding_window_pattern": 2,
        }
    if twin.sparsity == "qwen":
        step, mlp_only = sparse_layout(layers, count)
        return {"decoder_sparse_step": step, "mlp_only_layers": mlp_only}
    keys = ernie_layout(layers, count)
    if keys is None:
        raise ValueError(
            f"{twin.model_type} makes layers start..end every `interval` sparse; MoE layers {layers} of {count} are no "
            "such set (e.g. --layers interval:K works)"
        )
    return keys


def expert_tensors(twin: Twin, prefix: str, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """The released layout of one MoE layer's experts from moekit's fused `up` [E, 2I, H] (gate rows first) and
    `down` [E, H, I]; `prefix` is the MoE block's path (`model.layers.3.mlp`)."""
    if twin.experts == "fused":
        return {f"{prefix}.experts.gate_up_proj": up, f"{prefix}.experts.down_proj": down}
    if twin.experts == "fused_transposed":
        return {
            f"{prefix}.experts.gate_up_proj": up.transpose(1, 2).contiguous(),
            f"{prefix}.experts.down_proj": down.transpose(1, 2).contiguous(),
        }
    if twin.experts == "granite":
        return {f"{prefix}.input_linear.weight": up, f"{prefix}.output_linear.weight": down}
    gate_name, up_name, down_name = twin.expert_names
    out = {}
    width = up.shape[1] // 2
    for e in range(up.shape[0]):
        out[f"{prefix}.experts.{e}.{gate_name}.weight"] = up[e, :width].contiguous()
        out[f"{prefix}.experts.{e}.{up_name}.weight"] = up[e, width:].contiguous()
        out[f"{prefix}.experts.{e}.{down_name}.weight"] = down[e].contiguous()
    return out


def expert_shapes(twin: Twin, prefix: str, experts: int, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes `expert_tensors` writes, from the sizes alone (to plan shards before reading)."""
    meta = torch.empty(experts, 2 * width, hidden, device="meta"), torch.empty(experts, hidden, width, device="meta")
    return {k: tuple(v.shape) for k, v in expert_tensors(twin, prefix, *meta).items()}
