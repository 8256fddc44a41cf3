"""Vid-LLM's Cross-Task Adapter as a synergy head inside the MoE-LLM, on the visual tokens of one decoder layer.

Shared tokens T (the output of decoder layer `layer` at the image/video token positions) split into
T_geom = phi_geom(T) and T_lang = phi_lang(T); K learnable bridge tokens read both streams,
T'_bridge = Attn(T_bridge, T_geom, T_geom) + Attn(T_bridge, T_lang, T_lang), and each stream reads the bridge
back (T'_s = T_s + Attn(T_s, T'_bridge, T'_bridge): the paper says only "integrated into the streams").
T'_lang is what the LLM goes on with (Vid-LLM's reasoning branch reads T'_lang): a forward hook on the layer adds
to_llm(T'_lang) to the visual tokens' hidden states, to_llm zero-initialised so the model starts unchanged.
Losses against a geometry teacher (`spatial`) and a semantic teacher (`semantic`), Vid-LLM eq. 6-7:
L_geo = mean_i ||norm(g_i) - norm(t_i)||^2, L_lang = 1 - cos(mean g', mean t'),
L_sc = ||Z_s Z_s^T - Z_t Z_t^T||_F^2 / M^2 over L2-normalised, concatenated geometry + language tokens.
Student and teacher tokens of a sample are pooled (in order) to the fewest of their counts when they differ.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from moekit.config import StrictModel
from moekit_plugins.synergy.layer_hook import LayerHook
from moekit_plugins.synergy.pooling import check_teacher_keys, last_hidden, pool_tokens, sample_mask

PATHS = ("spatial", "semantic")


class CrossTaskParams(StrictModel):
    num_bridge: int = Field(16, ge=1, description="K bridge tokens (16 is best in Vid-LLM's ablation)")
    width: int | None = Field(None, ge=1, description="adapter width C; default: the LLM hidden size")
    heads: int = Field(4, ge=1, description="attention heads of the bridge attention (must divide the width)")
    layer: int = Field(0, description="decoder layer whose output gives the shared tokens (negative: from the end)")
    feedback: bool = Field(True, description="add the fused T'_lang (zero-initialised projection) back to the layer")
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
    """`prepare(model)` sizes the adapter, learns the visual token ids and hooks decoder layer `layer`; every
    forward of the model then runs the adapter there (and feeds T'_lang back). `forward` returns `cta_geometry`,
    `cta_language` and (with `structure`) `cta_structure` for the streams of the model's last forward."""

    feeds_model = True  # changes the model's forward: attached again when a saved model is opened

    def __init__(self, params: CrossTaskParams):
        super().__init__()
        self.params = params
        self.visual_ids: list[int] = []
        self.built = False
        self._hook: LayerHook | None = None
        self._streams: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def loss_names(self) -> tuple[str, ...]:
        p = self.params
        names = [n for n, d in (("cta_geometry", p.spatial_dim), ("cta_language", p.semantic_dim)) if d]
        return tuple(names + (["cta_structure"] if p.structure else []))

    def prepare(self, model: nn.Module, tokenizer=None) -> None:
        """Find the visual token ids and the decoder layers (architecture adapter), build the layers at the
        model's width (once) and hook layer `layer` (again on every call, replacing an earlier hook)."""
        from moekit.arch import resolve_arch

        adapter = resolve_arch(model)
        self.visual_ids = [*adapter.image_token_ids, *adapter.video_token_ids]
        if not self.visual_ids:
            raise ValueError(f"{adapter.model_type} has no image/video token ids; the adapter reads visual tokens")
        p = self.params
        if not -adapter.num_layers <= p.layer < adapter.num_layers:
            raise ValueError(f"vidllm_cta: layer={p.layer}, but the model has {adapter.num_layers} decoder layers")
        if not self.built:
            self._build(model.get_input_embeddings().embedding_dim)
            self.to(model.get_input_embeddings().weight.device)
        self.remove()
        self._hook = LayerHook(model, adapter.layers, p.layer, self._run)

    def _build(self, hidden: int) -> None:
        p = self.params
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
        if p.feedback:
            # T'_lang back to the LLM width, zero-initialised: an upcycled model is unchanged at step 0.
            self.to_llm = nn.Linear(width, hidden)
            nn.init.zeros_(self.to_llm.weight)
            nn.init.zeros_(self.to_llm.bias)
        self.built = True

    def remove(self) -> None:
        """Take the hook off the model (the head keeps its weights)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _run(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The layer hook: adapt the visual tokens; in training keep the streams for the losses; add
        to_llm(T'_lang) to the visual tokens' hidden states (feedback) so the next layers read it. The head
        follows the hidden states to their device: a model moved after the head was attached (`open_model_dir`,
        then `model.to("cuda")`) moves it too."""
        if self.bridge.device != hidden.device:
            self.to(hidden.device)
        visual = self.visual_mask(input_ids)
        tokens, padding = self.pack(hidden, visual)
        geom, lang = self.adapt(tokens.to(self.bridge.dtype), padding)
        if self.training:
            self._streams = (geom, lang, padding)
        if not self.params.feedback:
            return hidden
        delta = hidden.new_zeros(hidden.shape)
        delta[visual] = self.to_llm(lang)[~padding].to(hidden.dtype)
        return hidden + delta

    def adapt(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared tokens [B, N, H] (`padding` [B, N] True = pad) -> (T'_geom, T'_lang), each [B, N, C]."""
        if padding is not None:  # a sample without visual tokens attends to its zero row (no NaN from -inf rows)
            padding = padding.clone()
            padding[padding.all(-1), 0] = False
        geom, lang = self.phi_geom(tokens), self.phi_lang(tokens)
        bridge = self.bridge.expand(tokens.shape[0], -1, -1)
        bridge = (
            self.read_geom(bridge, geom, geom, key_padding_mask=padding, need_weights=False)[0]
            + self.read_lang(bridge, lang, lang, key_padding_mask=padding, need_weights=False)[0]
        )
        geom = geom + self.fuse_geom(geom, bridge, bridge, need_weights=False)[0]
        lang = lang + self.fuse_lang(lang, bridge, bridge, need_weights=False)[0]
        return geom, lang

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.built:
            raise RuntimeError("call head.prepare(model) first")
        return torch.isin(input_ids, torch.tensor(self.visual_ids, device=input_ids.device))

    def pack(self, hidden: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states at `visual` [B, L] packed to [B, N_max, H] and the padding mask [B, N_max] (True = pad)."""
        counts = visual.sum(-1)
        width = max(int(counts.max()) if counts.numel() else 0, 1)
        packed = hidden.new_zeros(hidden.shape[0], width, hidden.shape[-1])
        padding = torch.arange(width, device=hidden.device)[None] >= counts[:, None]
        packed[~padding] = hidden[visual]
        return packed, padding

    def shared_tokens(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual-token hidden states packed to [B, N_max, H] and the padding mask [B, N_max] (True = pad)."""
        return self.pack(hidden, self.visual_mask(input_ids))

    def forward(
        self, *, hidden_states: torch.Tensor | tuple, input_ids: torch.Tensor, teacher: Mapping[str, object]
    ) -> dict[str, torch.Tensor]:
        """The losses of the streams the hooked layer produced in the model's last training forward (taken,
        so each forward's streams are used once); without one, of the adapter run on `hidden_states` (a [B, L, H]
        tensor, or the model's tuple, where layer i's output is entry i + 1). teacher: `spatial` / `semantic`
        token features [B, N_t, D] or None, optional `<path>_mask` [B] and `<path>_tokens_mask` [B, N_t]. A
        sample without visual tokens may carry no teacher."""
        check_teacher_keys(teacher, PATHS, "vidllm_cta")
        if self._streams is not None:
            (geom, lang, padding), self._streams = self._streams, None
        else:
            layer = self.params.layer
            hidden = last_hidden(hidden_states, layer + 1 if layer >= 0 else layer)
            tokens, padding = self.shared_tokens(hidden, input_ids)
            geom, lang = self.adapt(tokens.to(self.bridge.dtype), padding)
        weight = self.bridge
        batch = geom.shape[0]
        active = {path: sample_mask(teacher, path, batch, geom.device) for path in PATHS}
        per_sample = {name: [] for name in ("cta_geometry", "cta_language", "cta_structure")}
        for b in range(batch):
            n = int((~padding[b]).sum())
            targets = {p: self._target(teacher, p, b, n, weight.dtype) for p in PATHS if bool(active[p][b])}
            # One token count for the student streams and every teacher of the sample: the fewest (in order).
            m = min([n, *(t.shape[0] for t in targets.values())])
            targets = {p: _fit(t, m) for p, t in targets.items()}
            streams = {"spatial": _fit(geom[b, :n], m), "semantic": _fit(lang[b, :n], m)}
            for path, name, loss, head in (
                ("spatial", "cta_geometry", geometry_loss, self.to_spatial),
                ("semantic", "cta_language", language_loss, self.to_semantic),
            ):
                if path in targets:
                    per_sample[name].append((b, loss(head(streams[path]), targets[path])))
            if self.params.structure and len(targets) == 2:
                z_student = torch.cat([streams["spatial"], streams["semantic"]])
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
        return features


def _fit(tokens: torch.Tensor, m: int) -> torch.Tensor:
    """[N, D] tokens pooled in order to m <= N (unchanged when N == m)."""
    return tokens if tokens.shape[0] == m else pool_tokens(tokens[None], m)[0]


def _mlp(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, out), nn.GELU(), nn.Linear(out, out))


def _mean(items: list[tuple[int, torch.Tensor]], anchor: torch.Tensor) -> torch.Tensor:
    """Mean over the samples that produced a term; exactly 0, still attached to the graph, when none did."""
    return torch.stack([v for _, v in items]).mean() if items else anchor.sum() * 0.0
