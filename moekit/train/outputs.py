"""Stage inputs and outputs: load the model a stage starts from, and write what it produced.

A stage's output is `<output_dir>/<stage>/model/`, written atomically, with its provenance (`moekit.json`:
format, stage, steps; `recipe.yaml`: the recipe that made it; see `moekit.config.provenance`):
- `full`: a transformers checkpoint (`save_pretrained`), a moekit MoE checkpoint for upcycled models, plus the
  tokenizer and processor files and `synergy_heads.safetensors` when heads trained;
- `ffn_only`: only the decoder FFN tensors of a dense model, under the exact key names `save_pretrained` of
  that family writes (e.g. `model.layers.0.mlp.gate_proj.weight` for Qwen2.5-VL), for
  `moekit upcycle --expert image=DIR` and `upcycle` steps of later stages;
- `lora_adapter`: the peft adapter only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moekit.arch import ArchAdapter, ffn_state_keys, resolve_arch
from moekit.attach.position import save_weights
from moekit.config.provenance import PROVENANCE_FILES, EncoderRef, Provenance, read_provenance, write_provenance
from moekit.io.atomic import atomic_dir
from moekit.io.files import copy_side_files

if TYPE_CHECKING:
    from moekit.train.stream_save import LayerStream

FORMATS = ("full", "ffn_only", "lora_adapter")
NOT_COPIED = {"config.json", "generation_config.json", "model.safetensors.index.json", *PROVENANCE_FILES}


def output_path(stage_dir: Path) -> Path:
    return stage_dir / "model"


def load_model(path: str | Path, *, where: str, sharded: bool = False) -> nn.Module:
    """A dense transformers model or a moekit MoE model from a local directory, in float32.

    `sharded`: leave the decoder layers on the meta device for the FSDP2 or ZeRO-3 engine to fill with each
    process's part (`moekit.modeling.sharded`); the model carries them as `moekit_deferred`. A checkpoint that
    cannot be read by rows (a conversion that splits or fuses tensors) loads whole, with a warning.
    """
    from moekit.modeling.load import load_any

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{where}: {path} has no config.json; expected a local checkpoint directory")
    record = read_provenance(path)
    if record is not None and record.format != "full":
        raise ValueError(
            f"{where}: {path} holds a {record.format} output (stage {record.stage!r}), not a whole model; "
            "use it as an expert source of an upcycle step, or start from the stage it was trained from"
        )
    if sharded:
        from moekit.modeling.sharded import ShardedLoadError, load_deferred

        try:
            model, weights = load_deferred(path)
        except ShardedLoadError as exc:
            warnings.warn(f"{where}: {path} loads whole on every process: {exc}", stacklevel=2)
        else:
            model.moekit_deferred = weights
            return model
    return load_any(path, dtype=torch.float32)


def load_tokenizer(path: str | Path) -> Any | None:
    """The tokenizer saved beside a checkpoint, or None when it has none."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def saved_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Map module-path keys of `model` to the names `save_pretrained` writes for them (legacy renames).

    One key at a time with a placeholder tensor, so sharded parameters are never read: FFN tensors are only
    ever renamed, never split or fused, by transformers' conversions.
    """
    from transformers.core_model_loading import revert_weight_conversion

    names = {}
    for key in keys:
        (saved,) = revert_weight_conversion(model, {key: torch.empty(0)})
        names[key] = saved
    return names


def ffn_keys(model: nn.Module, adapter: ArchAdapter) -> list[str]:
    """Module-path keys of every decoder FFN tensor of a dense model."""
    state = model.state_dict()
    keys = []
    for layer in range(adapter.num_layers):
        for names in ffn_state_keys(adapter.ffn, adapter.ffn_prefix(layer)).values():
            keys += [k for k in names if k in state]
    return keys


def read_ffn_state(path: str | Path, model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """FFN tensors of a full or FFN-only checkpoint, keyed by module path of the dense `model` (same family)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{where}: {path} holds no .safetensors files")
    adapter = resolve_arch(model)
    names = saved_names(model, ffn_keys(model, adapter))
    wanted = {saved: module for module, saved in names.items()}
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                module_key = wanted.get(key, key if key in names else None)
                if module_key is not None:
                    out[module_key] = fh.get_tensor(key).float()
    missing = sorted(set(names) - set(out))
    if missing:
        raise KeyError(f"{where}: {path} lacks FFN tensors, e.g. {names[missing[0]]!r} ({len(missing)} missing)")
    return out


def _name_saved_dtype(config_file: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """config.json's `dtype` names the first parameter as written, not as held: `save_pretrained` reads the
    model's, which under FSDP2 in bf16 may be a frozen one kept in bf16 while every saved tensor is fp32."""
    first = next((n for n, p in model.named_parameters() if p.is_floating_point()), None)
    written = state.get(first) if first is not None else None
    config = json.loads(config_file.read_text())
    name = None if written is None else str(written.dtype).removeprefix("torch.")
    if name is not None and config.get("dtype") not in (None, name):
        config["dtype"] = name
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_output(
    target: Path,
    fmt: str,
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    heads: dict[str, torch.Tensor],
    encoders: tuple[list[dict[str, Any]], dict[str, torch.Tensor]] = ([], {}),
    tokenizer: Any | None,
    source_dir: Path | None,
    record: Provenance,
    recipe: dict[str, Any],
    stream: LayerStream | None = None,
) -> Path:
    """Write a stage's output. `model` supplies the config and key naming; `state` the trained weights (module
    paths of `model`, gathered on the main process; LoRA already merged for `full`); `record` its provenance;
    `stream` (`full` only) the decoder-layer tensors not in `state`, gathered as they are written."""
    with atomic_dir(target) as tmp:
        if fmt == "ffn_only":
            adapter = resolve_arch(model)
            if getattr(model.config, "moekit", None) is not None:
                raise ValueError("save: ffn_only is for dense specialists (stage 1-2); this model is an MoE model")
            keys = ffn_keys(model, adapter)
            model.save_pretrained(tmp, state_dict={k: state[k] for k in keys}, safe_serialization=True)
            record = record.model_copy(
                update={"layers": adapter.num_layers, "keys": sorted(saved_names(model, keys).values())}
            )
        elif fmt == "lora_adapter":
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            _name_saved_dtype(tmp / "config.json", model, state)
            if stream is not None:
                stream.write(tmp, model)
            if heads:
                save_file({k: v.contiguous() for k, v in heads.items()}, str(tmp / "synergy_heads.safetensors"))
            refs, encoder_state = encoders
            if refs:
                save_weights(tmp, encoder_state)
                record = record.model_copy(update={"position_encoders": [EncoderRef(**r) for r in refs]})
            copy_side_files(source_dir, tmp, NOT_COPIED)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        write_provenance(tmp, record.model_copy(update={"format": fmt}), recipe)
    return target
