"""`moekit data convert FORMAT SRC -o OUT`: datasets in the layouts their authors release -> moekit's files.

Each format is a module of this package with a `records(src, ctx, options) -> Iterator[Converted | Skipped]`
generator (the one place that knows the released layout) and an `Options` model (strict, may be empty);
`moekit.data.convert.sink.write_converted` does the rest for every format: streaming JSONL, resume, progress,
summary, atomic completion. `FORMATS` is the registry; modules are imported only when their format is used.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from moekit.data.convert.sink import Context, Converted, LayoutError, Skipped, Summary, write_converted

# format -> (module under moekit.data.convert, one line for `--help` and errors)
FORMATS: dict[str, tuple[str, str]] = {
    "llava-pretrain": ("llava_pretrain", "LLaVA-1.5-558K or a LLaVA-style JSON (mix665k) + images/ (stage 1-2)"),
    "llava-video-178k": ("llava_video", "LLaVA-Video-178K: per-source JSONs + video folders"),
    "sharegpt4video": ("sharegpt4video", "ShareGPT4Video: image <-> video pairs (first frame vs a non-adjacent clip)"),
    "llava-3d": ("llava_3d", "LLaVA-3D-Instruct JSONs over ScanNet posed images -> scene folders"),
    "scannet": ("scannet", "ScanNet SensReader export (color/depth/pose/intrinsic) -> scene folders"),
    "3rscan": ("rscan", "3RScan sequences: image <-> 3D pairs from sampled views"),
    "scan2cap": ("scan2cap", "Scan2Cap captions over ScanNet: image <-> 3D pairs from sampled views"),
}


def format_module(name: str) -> Any:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(sorted(FORMATS))}")
    return importlib.import_module(f"moekit.data.convert.{FORMATS[name][0]}")


def convert_dataset(
    name: str,
    src: str | Path,
    out: str | Path,
    options: dict[str, Any] | None = None,
    *,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Summary:
    """Convert the released dataset at `src` (format `name`) into `out`; see `sink.write_converted`."""
    from moekit.config import parse_config

    module = format_module(name)
    opts = parse_config(module.Options, options or {}, source=f"moekit data convert {name}")
    src, out = Path(src), Path(out)
    if hasattr(module, "check_source"):
        module.check_source(src, opts)  # a wrong layout is refused before OUT is touched
    return write_converted(
        lambda ctx: module.records(src, ctx, opts),
        out,
        fmt=name,
        src=src,
        options=opts.model_dump(),
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        total=module.count(src, opts) if hasattr(module, "count") else None,
    )


__all__ = ["FORMATS", "Context", "Converted", "LayoutError", "Skipped", "Summary", "convert_dataset", "format_module"]
