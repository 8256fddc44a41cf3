"""`TrainModule`: the model plus its synergy heads and position encoders, one forward that returns every raw loss
term.

Distributed wrappers (DDP, FSDP2, DeepSpeed) wrap this module, so head parameters are reduced and sharded with
the model's. The loop weights (`LossWeights`) and normalises the terms (`compose`), because the CE normaliser (answer tokens
of the whole optimizer step, over every process) is only known outside one micro-batch.

Synergy heads are plug-in components (`moekit_synergy_heads`): after `head.prepare(model, tokenizer)`,
`head(hidden_states=..., input_ids=..., teacher=...)` returns a dict of named loss tensors. Position encoders
(`moekit.attach.position`) are hooked into the model's visual tokens; each forward hands them the batch's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moekit.attach.position import feeding
from moekit.config.record import MoeRecord
from moekit.moe import MoeBlock, router_losses
from moekit.moe.context import get_context
from moekit.recipe.schema import Losses
from moekit.train.groups import hf_model


class TrainModule(nn.Module):
    """`model` (a transformers model, maybe under peft), `synergy_heads` and `position_encoders` (name -> module,
    the encoders already attached to the model)."""

    def __init__(
        self,
        model: nn.Module,
        heads: dict[str, nn.Module] | None = None,
        encoders: dict[str, nn.Module] | None = None,
    ):
        super().__init__()
        self.model = model
        self.synergy_heads = nn.ModuleDict(heads or {})
        self.position_encoders = nn.ModuleDict(encoders or {})
        self.is_moe = any(isinstance(m, MoeBlock) for m in hf_model(model).modules())
        # Parameters every forward must touch (set by sharded engines): a process whose micro-batch skips the
        # vision tower or a head would otherwise reduce fewer gradients than the others and deadlock.
        self.touch: set[str] = set()
        # Set when the decoder layers are still on the meta device (`train.outputs.load_model(..., sharded=True)`):
        # the FSDP2 and ZeRO-3 engines fill each process's part from the checkpoint while wrapping.
        self.deferred = vars(hf_model(model)).pop("moekit_deferred", None)

    def forward(
        self,
        inputs: dict[str, Any],
        labels: torch.Tensor,
        teacher: dict[str, Any] | None = None,
        sample_modalities: list[str | None] | None = None,
        geometry: list[dict[str, torch.Tensor] | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Raw terms: `ce_sum` (summed over answer tokens), `ce_tokens`, router losses, `<head>/<term>`."""
        base = hf_model(self.model)
        if self.is_moe:
            context = get_context(base)
            context.sample_modalities = sample_modalities
            # peft calls the inner forward directly, past the model's pre-hook: fill the context here.
            context.observe(inputs.get("input_ids"), inputs.get("attention_mask"))
        with feeding(self.position_encoders, base, inputs.get("input_ids"), geometry):
            out = self.model(**inputs, use_cache=False, output_hidden_states=bool(self.synergy_heads))
        shift_labels = labels[:, 1:]
        answer = shift_labels != -100
        logits = out.logits[:, :-1][answer].float()
        terms = {
            "ce_sum": F.cross_entropy(logits, shift_labels[answer], reduction="sum"),
            "ce_tokens": answer.sum(),
        }
        if self.is_moe:
            router = router_losses(base)
            terms["load_balancing"] = router.load_balancing
            terms["z_loss"] = router.z_loss
        for name, head in self.synergy_heads.items():
            produced = head(
                hidden_states=out.hidden_states[-1], input_ids=inputs.get("input_ids"), teacher=teacher or {}
            )
            for term, value in produced.items():
                terms[f"{name}/{term}"] = value
        if self.touch:
            touched = [p.reshape(-1)[0] for n, p in self.named_parameters() if n in self.touch and p.requires_grad]
            if touched:
                terms["ce_sum"] = terms["ce_sum"] + 0.0 * torch.stack(touched).sum()
        return terms


@dataclass(frozen=True)
class LossWeights:
    """The weight of every raw loss term a `TrainModule` returns, from the recipe's `losses:` (router weights
    default to the coefficients the model was upcycled with). The one place that weights the losses: the loss
    that is back-propagated and the total that is logged both use it."""

    ce: float
    load_balancing: float
    z_loss: float
    synergy: dict[str, tuple[float, dict[str, float]]]  # head -> (weight of the head, per-term weights)

    @classmethod
    def of(cls, losses: Losses, model: nn.Module) -> LossWeights:
        record = MoeRecord.of(hf_model(model).config)
        alpha = losses.load_balancing if losses.load_balancing is not None else getattr(record, "aux_loss_coef", 0.0)
        z = losses.z_loss if losses.z_loss is not None else getattr(record, "z_loss_coef", 0.0)
        heads = {h.name: (h.weight, dict(h.terms)) for h in losses.synergy}
        return cls(losses.ce, float(alpha), float(z), heads)

    def weight(self, term: str) -> float:
        """The weight of a raw term: `ce_sum`, `load_balancing`, `z_loss` or `<head>/<term>` (0 for others)."""
        if term == "ce_sum":
            return self.ce
        if term in ("load_balancing", "z_loss"):
            return getattr(self, term)
        head, _, name = term.partition("/")
        if head in self.synergy:
            weight, terms = self.synergy[head]
            return weight * terms.get(name, 1.0)
        return 0.0


def compose(terms: dict[str, torch.Tensor], weights: LossWeights, ce_scale: float, micro_scale: float) -> torch.Tensor:
    """The loss to back-propagate for one micro-batch.

    `ce_scale` turns the summed CE into its share of the step's token mean (world_size / answer tokens of the
    step over all processes, since the gradient reduction averages over processes); `micro_scale` (1 /
    grad_accum) averages the per-micro-batch terms over the step.
    """
    total = weights.ce * ce_scale * terms["ce_sum"]
    for key, value in terms.items():
        weight = 0.0 if key in ("ce_sum", "ce_tokens") else weights.weight(key)
        if weight:
            total = total + micro_scale * weight * value
    return total
