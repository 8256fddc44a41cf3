"""Function preservation, proven: the would-be MoE block of a layer, with every expert a copy of the dense FFN,
must compute what the dense FFN computes on a probe input. `moekit.upcycle` and `moekit upcycle` run this for
every layer they convert before anything is modified or written; `verify_checkpoint` (`moekit verify`) checks
a finished MoE checkpoint against its dense base end to end, on logits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.arch import ArchAdapter, ArchError, detect, ffn_tensors
from moekit.arch.adapter import describe_module
from moekit.config.record import MoeRecord
from moekit.modeling.structure import new_context
from moekit.moe import MoeBlock
from moekit.moe.block import SharedExpertMix


@torch.no_grad()
def copies_block(dense: nn.Module, adapter: ArchAdapter, record: MoeRecord, layer: int) -> MoeBlock:
    """The layer's MoE block with every expert (and any shared expert) a copy of `dense`, as views of the dense
    weights (no expert is held in memory), and a random router (with equal experts any routing gives the dense
    output)."""
    with torch.device("meta"):
        block = MoeBlock(
            new_context(record),
            hidden_size=adapter.hidden_size,
            intermediate_size=adapter.intermediate_size,
            num_experts=record.num_experts,
            top_k=record.top_k,
            act=copy.deepcopy(adapter.ffn.activation(dense)),
            gated=adapter.ffn.gated,
            biased=adapter.biased,
        )
    tensors = ffn_tensors(dense, adapter.ffn)
    roles = {"gate_up_proj": "up", "up_proj": "up", "down_proj": "down"}
    for attr, param in list(block.experts.named_parameters(recurse=False)):
        name = roles.get(attr.removesuffix("_bias")) + ("_bias" if attr.endswith("_bias") else "")
        shape = param.shape[1:]
        value = tensors[name] if name in tensors else torch.zeros(shape, dtype=tensors["down"].dtype)
        setattr(block.experts, attr, nn.Parameter(value[None].expand(record.num_experts, *shape), requires_grad=False))
    generator = torch.Generator().manual_seed(layer)
    weight = torch.randn(block.gate.weight.shape, generator=generator).to(tensors["down"])
    block.gate.weight = nn.Parameter(weight, requires_grad=False)
    if record.shared_expert:
        block.shared_expert = SharedExpertMix(dense, adapter.hidden_size).to(tensors["down"])
    block.layer_index = layer
    return block.eval()


def _extras(dense: nn.Module, adapter: ArchAdapter) -> list[str]:
    known = {*adapter.ffn.projections(), adapter.ffn.act}
    return [f"{n}: {type(c).__name__}" for n, c in dense.named_children() if n not in known]


@torch.no_grad()
def check_layer(dense: nn.Module, adapter: ArchAdapter, record: MoeRecord, layer: int) -> float:
    """Refuse (ArchError) unless the layer's would-be MoE block computes the dense FFN; the largest difference."""
    where = f"layer {layer} ({adapter.ffn_prefix(layer)}, {type(dense).__name__})"
    problem = None if adapter.inline else detect.signature_problem(dense)
    if problem is not None:
        raise ArchError(f"{where}: {problem}; moekit's MoE block is called with the hidden states alone")
    weight = getattr(dense, adapter.ffn.down).weight
    x = detect.probe_input(adapter.hidden_size, weight.dtype, weight.device, seed=layer)
    block = copies_block(dense, adapter, record, layer)
    if adapter.inline:  # the layer runs up -> its activation -> down itself; the block's halves stand in for them
        act = adapter.ffn.activation(dense)
        want = getattr(dense, adapter.ffn.down)(act(getattr(dense, adapter.ffn.up)(x)))
        got = block.route_down(act(block.route_up(x)))
    else:
        residual = (detect.probe_input(adapter.hidden_size, weight.dtype, weight.device, seed=layer + 1),)
        args = (x, *residual) if detect.takes_residual(dense) else (x,)
        was_training = dense.training
        dense.eval()
        try:
            want = dense(*args)
        finally:
            dense.train(was_training)
        want = want[0] if isinstance(want, tuple) else want
        got = block(*args)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        raise ArchError(f"{where}: its forward returns {type(want).__name__}, not a tensor of the input's shape")
    difference = detect.max_difference(got, want)
    if not detect.close(got, want):
        extras = _extras(dense, adapter)
        beyond = f"it has {', '.join(extras)} beyond" if extras else "its forward computes more than"
        raise ArchError(
            f"{where}: an MoE block whose experts are all copies of this FFN differs from it by {difference:.3g} "
            f"on a probe input; {beyond} the {adapter.ffn.kind} layout moekit matched "
            f"({', '.join(adapter.ffn.projections())}). Upcycling it would change the model, so moekit refuses. "
            f"Its children: {describe_module(dense)}"
        )
    return difference


def check_layers(model: nn.Module, adapter: ArchAdapter, record: MoeRecord, layers: list[int]) -> dict[int, float]:
    """`check_layer` for every layer to convert, each against its own FFN (widths and classes may differ). A model
    without weights (on the meta device: `moekit inspect --layers`) has no function to preserve and is skipped."""
    out = {}
    for layer in layers:
        dense = adapter.ffn_module(model, layer)
        if getattr(dense, adapter.ffn.down).weight.device.type == "meta":
            continue
        shapes = {k: tuple(v.shape) for k, v in ffn_tensors(dense, adapter.ffn).items()}
        want_up = ((2 if adapter.ffn.gated else 1) * adapter.intermediate_size, adapter.hidden_size)
        if shapes["up"] != want_up or shapes["down"] != (adapter.hidden_size, adapter.intermediate_size):
            raise ArchError(
                f"layer {layer} ({adapter.ffn_prefix(layer)}): its FFN is {shapes['up']} / {shapes['down']}, layer "
                f"{adapter.layers}.0's is {want_up} / {(adapter.hidden_size, adapter.intermediate_size)}; moekit "
                "upcycles layers whose FFNs have the first layer's width (choose the layers with --layers)"
            )
        out[layer] = check_layer(dense, adapter, record, layer)
    return out


# --- a finished checkpoint against its base --------------------------------------------------------------------


@dataclass
class VerifyReport:
    """`moekit verify`: logits of the MoE (experts replaced by the base FFN, and as it is) vs the dense model."""

    replaced: float  # max |logit difference| with every expert set to the base FFN
    as_is: float | None  # the same for the checkpoint as it is (copies-only checkpoints)
    copies_only: bool
    layers: list[int]
    tolerance: float
    tokens: int
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        values = [self.replaced] + ([self.as_is] if self.as_is is not None and self.copies_only else [])
        return all(v <= self.tolerance for v in values)


def copies_only(record: MoeRecord) -> bool:
    """Whether every expert of the checkpoint started as an unperturbed copy of the base FFN."""
    experts = record.spec.get("experts") or []
    return all(
        e.get("source", "base") == "base"
        and not e.get("noise_scale")
        and not e.get("reinit_ratio")
        and not e.get("init")
        for e in experts
    )


def probe_ids(config: Any, length: int = 24, seed: int = 0) -> torch.Tensor:
    """Text token ids that avoid the model's special and visual tokens."""
    vocab = detect.text_config(config).vocab_size
    special = set()
    for source in (config, detect.text_config(config)):
        for key, value in vars(source).items():
            if key.endswith(("token_id", "token_index")) and isinstance(value, int):
                special.add(value)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(4, min(vocab, 32000)), (1, length), generator=generator)
    for token in special:
        ids[ids == token] = 3
    return ids


@torch.no_grad()
def verify_checkpoint(moe_dir: str | Path, base_dir: str | Path, tolerance: float = 1e-4) -> VerifyReport:
    """Load both models in float32 and compare logits on a text probe."""
    from moekit.modeling.load import load, load_any

    moe = load(moe_dir, dtype=torch.float32).eval()
    dense = load_any(base_dir).eval()
    record = MoeRecord.of(moe.config)
    if dense.config.model_type != record.base_model_type:
        raise ValueError(
            f"{base_dir} is a {dense.config.model_type} model; {moe_dir} was upcycled from a {record.base_model_type}"
        )
    adapter = ArchAdapter.from_record(record)
    ids = probe_ids(dense.config)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    want = dense(**batch).logits
    as_is = float((moe(**batch).logits - want).abs().max())
    for block in (m for m in moe.modules() if isinstance(m, MoeBlock)):
        ffn = adapter.ffn_module(dense, block.layer_index)
        tensors = ffn_tensors(ffn, adapter.ffn)
        experts = block.experts
        for index in range(experts.num_experts):
            experts.up_weight[index].copy_(tensors["up"])
            experts.down_proj[index].copy_(tensors["down"])
            if experts.biased:
                experts.up_bias[index].copy_(tensors.get("up_bias", torch.zeros_like(experts.up_bias[index])))
                experts.down_proj_bias[index].copy_(
                    tensors.get("down_bias", torch.zeros_like(experts.down_proj_bias[index]))
                )
        if block.shared_expert is not None:
            block.shared_expert.expert.load_state_dict(ffn.state_dict())
    replaced = float((moe(**batch).logits - want).abs().max())
    notes = [] if copies_only(record) else ["the experts differ from the base FFN (specialists, noise or re-init)"]
    return VerifyReport(replaced, as_is, copies_only(record), record.layers, tolerance, ids.shape[1], notes)
