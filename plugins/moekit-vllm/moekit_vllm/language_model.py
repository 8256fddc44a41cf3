"""moekit's Qwen2 MoE language model on vLLM: vLLM's `Qwen2Model` with moekit's MoE layers as fused-MoE blocks.

It serves moekit's text checkpoints of the Qwen2 / Qwen2.5 family (`model_type: moekit_qwen2`) and is the language
model inside `moekit_vllm.qwen2_5_vl`. Everything but the MoE layers is vLLM's own code, reused by composition:
the decoder stack, attention and dense MLPs come from `Qwen2Model`, which takes the decoder-layer class as an
argument (and is compiled for both 1-D and M-RoPE's `(3, T)` positions). What is written here is only what moekit
adds:

- `MoekitMoeBlock`: moekit's router (softmax over the experts, top-k, weights renormalised: `renormalize=True`)
  as a `GateLinear`, the experts as `FusedMoEFactory`, and moekit's optional shared expert mixed in convexly,
  `routed + sigmoid(g(x)) * (shared(x) - routed)` (vLLM's own `shared_experts=` argument adds, so the mix is
  computed here);
- the loader's two moekit specifics: the experts are stored fused as `experts.gate_up_proj [E, 2I, H]` (gate rows
  first) / `experts.down_proj [E, H, I]`, which vLLM's routed-experts loader takes untransposed, and each MoE
  layer's dense FFN key holds a zero-size guard tensor (it makes plain transformers refuse the checkpoint), which
  is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2MLP, Qwen2Model
from vllm.model_executor.models.utils import AutoWeightsLoader, PPMissingLayer, extract_layer_index, maybe_prefix
from vllm.sequence import IntermediateTensors

from moekit_vllm.config import MoeLayout

# The dense FFN weight moekit writes as a zero-size guard in every MoE layer (moekit.modeling.structure.guard_key).
_GUARD = re.compile(r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


class MoekitSharedMix(nn.Module):
    """moekit's shared expert: a dense SwiGLU FFN and a one-unit gate; `mix` blends it with the routed output."""

    def __init__(self, hidden_size: int, intermediate_size: int, quant_config, prefix: str):
        super().__init__()
        self.expert = Qwen2MLP(hidden_size, intermediate_size, "silu", quant_config, prefix=f"{prefix}.expert")
        self.gate = ReplicatedLinear(hidden_size, 1, bias=False, quant_config=None, prefix=f"{prefix}.gate")

    def mix(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        share = torch.sigmoid(self.gate(hidden_states)[0])
        return routed + share * (self.expert(hidden_states) - routed)


class MoekitMoeBlock(nn.Module):
    """One MoE layer: router, fused routed experts, optional shared expert (module names as moekit saves them)."""

    def __init__(self, hidden_size: int, layout: MoeLayout, quant_config, prefix: str):
        super().__init__()
        self.gate = GateLinear(hidden_size, layout.num_experts, prefix=f"{prefix}.gate")
        self.experts = FusedMoEFactory(
            num_experts=layout.num_experts,
            top_k=layout.top_k,
            hidden_size=hidden_size,
            intermediate_size=layout.intermediate_size,
            renormalize=True,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
        )
        self.shared_expert = (
            MoekitSharedMix(hidden_size, layout.intermediate_size, quant_config, f"{prefix}.shared_expert")
            if layout.shared_expert
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.view(-1, shape[-1])
        router_logits, _ = self.gate(flat)
        out = self.experts(hidden_states=flat, router_logits=router_logits)
        if self.shared_expert is not None:
            out = self.shared_expert.mix(flat, out)
        return out.view(shape)


class MoekitQwen2DecoderLayer(Qwen2DecoderLayer):
    """Qwen2's decoder layer; in moekit's MoE layers the MLP is an `MoekitMoeBlock`."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__(config=config, cache_config=cache_config, quant_config=quant_config, prefix=prefix)
        layout = MoeLayout.of(config)
        if layout is not None and extract_layer_index(prefix) in layout.layers:
            self.mlp = MoekitMoeBlock(config.hidden_size, layout, quant_config, prefix=f"{prefix}.mlp")


class MoekitQwen2ForCausalLM(nn.Module, SupportsPP):
    """The language model: vLLM's `Qwen2Model` built with moekit's decoder layer, and an LM head."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config.get_text_config()
        self.config = config
        self.moe_layers = set((MoeLayout.of(config) or MoeLayout((), 0, 0, 0, False)).layers)
        self.model = Qwen2Model(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), decoder_layer_type=MoekitQwen2DecoderLayer
        )
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def _without_guards(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            found = _GUARD.search(name)
            if found and int(found.group(1)) in self.moe_layers and tensor.numel() == 0:
                continue
            yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights = self._without_guards(weights)
        if self.config.tie_word_embeddings:
            weights = ((n, t) for n, t in weights if not n.startswith("lm_head."))
        return AutoWeightsLoader(self).load_weights(weights)
