"""`moekit.load(dir)`: open a moekit checkpoint from a local directory (safetensors only, no remote code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.config.record import PREFIX, MoeRecord
from moekit.modeling.attention import resolve_attn_implementation
from moekit.modeling.classes import moekit_classes


def read_record(path: str | Path) -> MoeRecord:
    """The `moekit` record of a checkpoint's config.json; a clear error when it is not a moekit checkpoint."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json here; expected a checkpoint directory written by moekit")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}: not valid JSON ({exc})") from None
    data = config.get("moekit")
    model_type = str(config.get("model_type"))
    if not isinstance(data, dict) or not model_type.startswith(PREFIX):
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is a dense checkpoint, not a moekit MoE one; "
            "upcycle it first (`moekit upcycle --base DIR ...` or moekit.upcycle(model, spec))"
        )
    return MoeRecord.parse(data, source=f"{config_file}: moekit")


def load(path: str | Path, *, experts_implementation: str | None = None, **kwargs: Any):
    """Load a moekit MoE checkpoint. Extra keyword arguments go to `from_pretrained` (dtype, device_map, ...).

    `experts_implementation` picks how the routed experts run (`eager`, `grouped_mm`, `batched_mm`, or `auto`:
    the fastest for the device of each forward).
    Only local files and safetensors are read; a checkpoint that lacks any weight is an error, never a model
    with randomly initialised experts.
    """
    record = read_record(path)
    _, model_cls = moekit_classes(record.base_model_type, record.model_class)
    if "attn_implementation" in kwargs:
        kwargs["attn_implementation"] = resolve_attn_implementation(kwargs["attn_implementation"])
    kwargs.update(local_files_only=True, trust_remote_code=False, use_safetensors=True, output_loading_info=True)
    model, info = model_cls.from_pretrained(str(path), **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or ()))
    if missing or mismatched:
        raise ValueError(f"{path}: checkpoint incomplete; missing {missing[:8]} mismatched {mismatched[:8]}")
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return model


def load_any(path: str | Path, **kwargs: Any):
    """A moekit MoE checkpoint through `load`, a dense one through its own transformers class (local safetensors
    only), in eval mode."""
    import torch

    from moekit.modeling.meta_model import model_class, read_config

    config = read_config(path)
    if getattr(config, "moekit", None) is not None:
        return load(path, **kwargs).eval()
    kwargs.setdefault("dtype", torch.float32)
    kwargs.update(local_files_only=True, trust_remote_code=False, use_safetensors=True)
    return model_class(config).from_pretrained(str(path), **kwargs).eval()
