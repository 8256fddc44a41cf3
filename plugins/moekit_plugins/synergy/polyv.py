"""PolyV's coarse synergy head: K `<synergy>` tokens whose last-layer states are projected onto teacher features.

L_coarse = ||F_temporal - mlp_t(F_syn)||^2 + ||F_spatial - mlp_g(F_syn)||^2 (SPEC eq. 7-8), each term a mean
over the K tokens and feature channels, averaged over the samples that carry that teacher.

The paper says only that the two alignment projectors differ slightly. moekit's choice: the temporal path is a
plain 2-layer MLP with GELU (V-JEPA 2 features are already LayerNorm-ed by the teacher); the geometric path
normalises its input and hidden state (LayerNorm) around a residual MLP block, because VGGT aggregator
features concatenate frame- and global-attention outputs of different scales.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field, model_validator
from torch import nn

from moekit.config import StrictModel
from moekit_plugins.synergy.pooling import check_teacher_keys, last_hidden, masked_mean, pool_tokens, sample_mask
from moekit_plugins.synergy.tokens import add_special_tokens

PATHS = ("temporal", "spatial")


class PolyVSynergyParams(StrictModel):
    num_tokens: int = Field(8, ge=1, description="K, the number of <synergy> tokens (and pooled teacher tokens)")
    token_format: str = Field("<synergy_{i}>", description="name of the i-th token; must contain {i}")
    temporal_dim: int | None = Field(None, ge=1, description="video teacher feature width (V-JEPA 2 ViT-L: 1024)")
    spatial_dim: int | None = Field(None, ge=1, description="3D teacher feature width (VGGT aggregator: 2048)")
    hidden_dim: int | None = Field(None, ge=1, description="projector width; default: the LLM hidden size")
    normalize_targets: bool = Field(False, description="LayerNorm (no affine) the pooled teacher tokens")
    init_noise: float = Field(0.02, ge=0.0, description="noise of new embedding rows, times the vocabulary std")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> PolyVSynergyParams:
        if self.temporal_dim is None and self.spatial_dim is None:
            raise ValueError("set temporal_dim and/or spatial_dim (the teacher feature widths to regress onto)")
        if "{i}" not in self.token_format:
            raise ValueError(f"token_format {self.token_format!r} must contain {{i}} so the K tokens differ")
        return self


class GeometricProjector(nn.Module):
    """LayerNorm -> Linear -> residual [LayerNorm -> Linear -> GELU -> Linear] -> LayerNorm -> Linear."""

    def __init__(self, width: int, hidden: int, out: int):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden))
        self.block = nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inp(x)
        return self.out(z + self.block(z))


class PolyVSynergyHead(nn.Module):
    """`prepare(model, tokenizer)` once, insert `head.text` into each prompt, then after a forward with
    `output_hidden_states=True`: `head(hidden_states=out.hidden_states, input_ids=ids, teacher={...})`."""

    def __init__(self, params: PolyVSynergyParams):
        super().__init__()
        self.params = params
        self.tokens = [params.token_format.format(i=i) for i in range(params.num_tokens)]
        self.token_ids: list[int] = []
        self.projectors = nn.ModuleDict()

    @property
    def placeholder_tokens(self) -> list[str]:
        """The K tokens the data layer places after the student's image (moekit.attach.synergy)."""
        return list(self.tokens)

    @property
    def text(self) -> str:
        """The K synergy tokens as one string, to place in the prompt where the model should 'think'."""
        return "".join(self.tokens)

    @property
    def loss_names(self) -> tuple[str, ...]:
        return tuple(f"synergy_{p}" for p in PATHS if self._dim(p) is not None)

    def _dim(self, path: str) -> int | None:
        return self.params.temporal_dim if path == "temporal" else self.params.spatial_dim

    def prepare(self, model: nn.Module, tokenizer) -> list[int]:
        """Add the tokens to the tokenizer and embeddings; size the projectors to the model. Returns the ids."""
        p = self.params
        self.token_ids = add_special_tokens(model, tokenizer, self.tokens, noise=p.init_noise, seed=p.seed)
        embeddings = model.get_input_embeddings().weight
        width = embeddings.shape[1]
        hidden = p.hidden_dim or width
        if not self.projectors:
            if p.temporal_dim is not None:
                self.projectors["temporal"] = nn.Sequential(
                    nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, p.temporal_dim)
                )
            if p.spatial_dim is not None:
                self.projectors["spatial"] = GeometricProjector(width, hidden, p.spatial_dim)
            self.to(embeddings.device)
        return self.token_ids

    def synergy_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F_syn [B, K, H] (zeros where absent) and [B] whether each sample holds every token exactly once."""
        if not self.token_ids:
            raise RuntimeError("call head.prepare(model, tokenizer) first")
        ids = torch.tensor(self.token_ids, device=input_ids.device)
        hits = input_ids[:, None, :] == ids[None, :, None]  # [B, K, L]
        counts = hits.sum(-1)
        repeated = (counts > 1).any(-1).nonzero().flatten().tolist()
        if repeated:
            raise ValueError(f"sample(s) {repeated} hold a <synergy> token more than once; insert head.text once")
        states = torch.einsum("bkl,blh->bkh", hits.to(hidden.dtype), hidden)
        return states, (counts == 1).all(-1)

    def forward(
        self, *, hidden_states: torch.Tensor | tuple, input_ids: torch.Tensor, teacher: Mapping[str, object]
    ) -> dict[str, torch.Tensor]:
        """Named loss terms `synergy_temporal` / `synergy_spatial` (one per configured path).

        teacher: `temporal` / `spatial` features [B, N, D] or None, optional `<path>_mask` [B] (which samples
        carry that teacher) and `<path>_tokens_mask` [B, N] (padding of variable-length features).
        """
        check_teacher_keys(teacher, PATHS, "polyv_synergy")
        hidden = last_hidden(hidden_states)
        states, present = self.synergy_states(hidden, input_ids)
        weight = next(self.projectors.parameters())
        states = states.to(weight.dtype)
        batch = hidden.shape[0]
        losses: dict[str, torch.Tensor] = {}
        for path in PATHS:
            features = teacher.get(path)
            if path not in self.projectors:
                if features is not None:
                    raise ValueError(f"polyv_synergy: a {path} teacher was given but {path}_dim is not set")
                continue
            prediction = self.projectors[path](states)
            active = sample_mask(teacher, path, batch, hidden.device)
            if not bool(active.any()):
                losses[f"synergy_{path}"] = masked_mean(prediction.sum((1, 2)), active, prediction)
                continue
            missing = (active & ~present).nonzero().flatten().tolist()
            if missing:
                raise ValueError(
                    f"sample(s) {missing} carry a {path} teacher but not all {len(self.tokens)} <synergy> tokens"
                )
            features = torch.as_tensor(features).to(hidden.device, weight.dtype)
            if features.dim() != 3 or features.shape[0] != batch or features.shape[-1] != self._dim(path):
                raise ValueError(
                    f"teacher {path} must be [batch={batch}, tokens, {path}_dim={self._dim(path)}], got {tuple(features.shape)}"
                )
            tokens_mask = teacher.get(f"{path}_tokens_mask")
            valid = active[:, None].expand(batch, features.shape[1])
            if tokens_mask is not None:
                valid = valid & torch.as_tensor(tokens_mask, device=hidden.device).bool()
            target = pool_tokens(features, self.params.num_tokens, valid)
            if self.params.normalize_targets:
                target = nn.functional.layer_norm(target, target.shape[-1:])
            per_sample = ((prediction - target.detach()) ** 2).mean(dim=(1, 2))
            losses[f"synergy_{path}"] = masked_mean(per_sample, active, prediction)
        return losses
