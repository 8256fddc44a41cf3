"""Vid-LLM's Cross-Task Adapter as a synergy head on the MoE-LLM's visual-token hidden states.

Shared tokens T (the hidden states at the image/video token positions of one layer) split into
T_geom = phi_geom(T) and T_lang = phi_lang(T); K learnable bridge tokens read both streams,
T'_bridge = Attn(T_bridge, T_geom, T_geom) + Attn(T_bridge, T_lang, T_lang), and each stream reads the bridge
back (T'_s = T_s + Attn(T_s, T'_bridge, T'_bridge): the paper says only "integrated into the streams").
Losses against a geometry teacher (`spatial`) and a semantic teacher (`semantic`), Vid-LLM eq. 6-7:
L_geo = mean_i ||norm(g_i) - norm(t_i)||^2, L_lang = 1 - cos(mean g', mean t'),
L_sc = ||Z_s Z_s^T - Z_t Z_t^T||_F^2 / M^2 over L2-normalised, concatenated geometry + language tokens.
Teacher tokens are pooled (in order) to the student's token count when they differ.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from moekit.config import StrictModel
from moekit_plugins.synergy.pooling import check_teacher_keys, last_hidden, pool_tokens, sample_mask

PATHS = ("spatial", "semantic")


class CrossTaskParams(StrictModel):
    num_bridge: int = Field(16, ge=1, description="K bridge tokens (16 is best in Vid-LLM's ablation)")
    width: int | None = Field(None, ge=1, description="adapter width C; default: the LLM hidden size")
    heads: int = Field(4, ge=1, description="attention heads of the bridge attention (must divide the width)")
    layer: int = Field(-1, description="which entry of hidden_states gives the shared tokens (-1 = last)")
    spatial_dim: int | None = Field(None, ge=1, description="geometry teacher feature width (e.g. VGGT/DINO)")
    semantic_dim: int | None = Field(None, ge=1, description="semantic teacher feature width (e.g. CLIP)")
    structure: bool = Field(True, description="compute L_sc (needs both teachers, of equal width)")

    @model_validator(mode="after")
    def _check(self) -> CrossTaskParams:
        if self.spatial_dim is None and self.semantic_dim is None:
            raise ValueError("set spatial_dim and/or semantic_dim (the teacher feature widths)")
        if self.structure and (self.spatial_dim is None or self.semantic_dim is None):
            raise ValueError("structure=true needs both spatial_dim and semantic_dim")
        if self.structure and self.spatial_dim != self.semantic_dim:
            raise ValueError(
                f"L_sc concatenates both teachers' tokens, so spatial_dim ({self.spatial_dim}) must equal "
                f"semantic_dim ({self.semantic_dim}); set structure: false otherwise"
            )
        return self


def geometry_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_i ||norm(s_i) - norm(t_i)||^2 for [N, D] tokens."""
    return ((F.normalize(student, dim=-1) - F.normalize(teacher, dim=-1)) ** 2).sum(-1).mean()


def language_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos(mean of student tokens, mean of teacher tokens) for [N, D] tokens."""
    return 1 - F.cosine_similarity(student.mean(0), teacher.mean(0), dim=0)


def structure_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||Z_s Z_s^T - Z_t Z_t^T||_F^2 / M^2 with Z the L2-normalised [M, C] tokens (widths may differ)."""
    zs, zt = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return ((zs @ zs.T - zt @ zt.T) ** 2).sum() / student.shape[0] ** 2


class CrossTaskHead(nn.Module):
    """`prepare(model)` sizes the adapter and learns the visual token ids; `forward` returns
    `cta_geometry`, `cta_language` and (with `structure`) `cta_structure`."""

    def __init__(self, params: CrossTaskParams):
        super().__init__()
        self.params = params
        self.visual_ids: list[int] = []
        self.built = False

    @property
    def loss_names(self) -> tuple[str, ...]:
        p = self.params
        names = [n for n, d in (("cta_geometry", p.spatial_dim), ("cta_language", p.semantic_dim)) if d]
        return tuple(names + (["cta_structure"] if p.structure else []))

    def prepare(self, model: nn.Module, tokenizer=None) -> None:
        """Find the visual token ids (architecture adapter) and build the layers at the model's width."""
        from moekit.arch import resolve_arch

        adapter = resolve_arch(model)
        self.visual_ids = [*adapter.image_token_ids, *adapter.video_token_ids]
        if not self.visual_ids:
            raise ValueError(f"{adapter.model_type} has no image/video token ids; the adapter reads visual tokens")
        if self.built:
            return
        p = self.params
        hidden = model.get_input_embeddings().embedding_dim
        width = p.width or hidden
        if width % p.heads:
            raise ValueError(f"vidllm_cta: heads={p.heads} must divide the width {width}")
        self.phi_geom = _mlp(hidden, width)
        self.phi_lang = _mlp(hidden, width)
        self.bridge = nn.Parameter(torch.randn(p.num_bridge, width) * 0.02)
        self.read_geom, self.read_lang, self.fuse_geom, self.fuse_lang = (
            nn.MultiheadAttention(width, p.heads, batch_first=True) for _ in range(4)
        )
        self.to_spatial = nn.Linear(width, p.spatial_dim) if p.spatial_dim else None
        self.to_semantic = nn.Linear(width, p.semantic_dim) if p.semantic_dim else None
        self.to(model.get_input_embeddings().weight.device)
        self.built = True

    def adapt(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared tokens [B, N, H] (`padding` [B, N] True = pad) -> (T'_geom, T'_lang), each [B, N, C]."""
        geom, lang = self.phi_geom(tokens), self.phi_lang(tokens)
        bridge = self.bridge.expand(tokens.shape[0], -1, -1)
        bridge = (
            self.read_geom(bridge, geom, geom, key_padding_mask=padding, need_weights=False)[0]
            + self.read_lang(bridge, lang, lang, key_padding_mask=padding, need_weights=False)[0]
        )
        geom = geom + self.fuse_geom(geom, bridge, bridge, need_weights=False)[0]
        lang = lang + self.fuse_lang(lang, bridge, bridge, need_weights=False)[0]
        return geom, lang

    def shared_tokens(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual-token hidden states packed to [B, N_max, H] and the padding mask [B, N_max] (True = pad)."""
        if not self.built:
            raise RuntimeError("call head.prepare(model) first")
        visual = torch.isin(input_ids, torch.tensor(self.visual_ids, device=input_ids.device))
        counts = visual.sum(-1)
        width = int(counts.max()) if counts.numel() else 0
        packed = hidden.new_zeros(hidden.shape[0], max(width, 1), hidden.shape[-1])
        padding = torch.ones(hidden.shape[0], max(width, 1), dtype=torch.bool, device=hidden.device)
        for b in range(hidden.shape[0]):
            n = int(counts[b])
            packed[b, :n] = hidden[b][visual[b]]
            padding[b, :n] = False
        return packed, padding

    def forward(
        self, *, hidden_states: torch.Tensor | tuple, input_ids: torch.Tensor, teacher: Mapping[str, object]
    ) -> dict[str, torch.Tensor]:
        """teacher: `spatial` / `semantic` token features [B, N_t, D] or None, optional `<path>_mask` [B] and
        `<path>_tokens_mask` [B, N_t]. A sample without visual tokens may carry no teacher."""
        check_teacher_keys(teacher, PATHS, "vidllm_cta")
        hidden = last_hidden(hidden_states, self.params.layer)
        weight = self.bridge
        tokens, padding = self.shared_tokens(hidden, input_ids)
        geom, lang = self.adapt(tokens.to(weight.dtype), padding)
        batch = hidden.shape[0]
        active = {path: sample_mask(teacher, path, batch, hidden.device) for path in PATHS}
        students = {"spatial": (geom, self.to_spatial), "semantic": (lang, self.to_semantic)}
        per_sample = {name: [] for name in ("cta_geometry", "cta_language", "cta_structure")}
        for b in range(batch):
            n = int((~padding[b]).sum())
            targets = {}
            for path in PATHS:
                if bool(active[path][b]):
                    targets[path] = self._target(teacher, path, b, n, weight.dtype)
            for path, name, loss in (
                ("spatial", "cta_geometry", geometry_loss),
                ("semantic", "cta_language", language_loss),
            ):
                if path in targets:
                    stream, head = students[path]
                    per_sample[name].append((b, loss(head(stream[b, :n]), targets[path])))
            if self.params.structure and len(targets) == 2:
                z_student = torch.cat([geom[b, :n], lang[b, :n]])
                z_teacher = torch.cat([targets["spatial"], targets["semantic"]])
                per_sample["cta_structure"].append((b, structure_loss(z_student, z_teacher)))
        anchor = geom.sum() + lang.sum()
        return {name: _mean(per_sample[name], anchor) for name in self.loss_names}

    def _target(self, teacher: Mapping[str, object], path: str, b: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        dim = self.params.spatial_dim if path == "spatial" else self.params.semantic_dim
        if dim is None:
            raise ValueError(f"vidllm_cta: a {path} teacher was given but {path}_dim is not set")
        if n == 0:
            raise ValueError(f"sample {b} carries a {path} teacher but has no visual tokens")
        features = torch.as_tensor(teacher[path])[b].to(self.bridge.device, dtype)
        if features.dim() != 2 or features.shape[-1] != dim:
            raise ValueError(f"teacher {path} must be [batch, tokens, {dim}], sample {b} is {tuple(features.shape)}")
        mask = teacher.get(f"{path}_tokens_mask")
        mask = None if mask is None else torch.as_tensor(mask)[b][None].to(features.device)
        if mask is not None:
            features = features[mask[0].bool()]
        if features.shape[0] == n:
            return features
        return pool_tokens(features[None], n)[0]


def _mlp(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, out), nn.GELU(), nn.Linear(out, out))


def _mean(items: list[tuple[int, torch.Tensor]], anchor: torch.Tensor) -> torch.Tensor:
    """Mean over the samples that produced a term; exactly 0, still attached to the graph, when none did."""
    return torch.stack([v for _, v in items]).mean() if items else anchor.sum() * 0.0
