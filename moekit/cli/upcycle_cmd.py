"""`moekit upcycle`: streaming conversion of a dense checkpoint plus specialists into an MoE checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


def parse_expert(text: str) -> dict:
    """`NAME=SOURCE[,key=value...]` or `base` -> an ExpertSpec dict (keys: noise_scale, reinit_ratio, seed, lora_scale, modality)."""
    head, *options = text.split(",")
    name, _, source = head.partition("=")
    entry: dict = {"name": name.strip(), "source": (source or "base").strip()}
    for option in options:
        key, _, value = option.partition("=")
        if not value:
            raise ValueError(
                f"--expert {text!r}: option {option!r} must be key=value (noise_scale, reinit_ratio, seed, lora_scale, modality)"
            )
        entry[key.strip()] = value.strip()
    return entry


def upcycle(
    spec_file: Path = typer.Argument(None, help="UpcycleSpec YAML (optional; flags override it)", exists=False),
    base: str = typer.Option(None, "--base", help="dense base checkpoint directory"),
    expert: list[str] = typer.Option(
        None,
        "--expert",
        help="NAME=SOURCE[,noise_scale=..,reinit_ratio=..,seed=..]; SOURCE is a checkpoint dir, an FFN-only dir, a LoRA adapter dir, or 'base'; repeat per expert",
    ),
    layers: str = typer.Option(None, "--layers", help="interval:K[:OFFSET], first_half, last_half, full or 0,4,8"),
    top_k: int = typer.Option(None, "--top-k", help="experts per token"),
    num_experts: int = typer.Option(
        None, "--num-experts", help="only without --expert: that many copies of the base FFN"
    ),
    output: Path = typer.Option(..., "-o", "--output", help="output directory (written atomically)"),
    overrides: list[str] = typer.Option(None, "--set", help="override a spec field: key=value, e.g. router.std=0.01"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output directory"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    dtype: Literal[tuple(DTYPES)] = typer.Option(
        None, "--dtype", help="cast floating tensors (default: keep each source's)"
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="also read .bin/.pt sources (torch.load weights_only=True)"
    ),
    compare: bool = typer.Option(
        True, "--compare/--no-compare", help="compare specialists' non-FFN tensors with the base first"
    ),
    shard_size: float = typer.Option(4.0, "--shard-size", help="maximum output shard size in GB"),
) -> None:
    """Upcycle a dense checkpoint into an MoE checkpoint, streaming with bounded memory.

    Example: moekit upcycle --base ./Qwen2.5-VL-7B-Instruct --expert image=./ckpt/image --expert video=./ckpt/video
    --expert 3d=./ckpt/3d --expert base --layers interval:4 --top-k 2 -o ./polyv-moe
    """
    import torch
    from rich.console import Console

    from moekit.config import apply_overrides, load_yaml, parse_config
    from moekit.upcycle import UpcycleSpec
    from moekit.upcycle.convert import convert

    data = load_yaml(spec_file) if spec_file else {}
    if isinstance(data, dict) and set(data) == {"upcycle"}:
        data = data["upcycle"]
    for key, value in (("base", base), ("layers", layers), ("top_k", top_k), ("num_experts", num_experts)):
        if value is not None:
            data[key] = value
    if expert:
        data["experts"] = [parse_expert(e) for e in expert]
        data.setdefault("num_experts", len(expert))
        data["num_experts"] = len(expert)
    data = apply_overrides(data, overrides or [])
    spec = parse_config(UpcycleSpec, data, source=str(spec_file) if spec_file else "command line")
    torch_dtype = getattr(torch, DTYPES[dtype]) if dtype else None
    report = convert(
        spec,
        output,
        overwrite=overwrite,
        progress=not quiet,
        dtype=torch_dtype,
        allow_pickle=allow_pickle,
        compare=compare,
        max_shard_bytes=int(shard_size * 1024**3),
    )
    console = Console(stderr=True, quiet=quiet)
    for name, groups in report.divergence.items():
        changed = {g: d for g, d in groups.items() if d > 0}
        console.print(
            f"expert {name}: non-FFN tensors "
            + (f"differ from the base in {len(changed)} group(s)" if changed else "identical to the base")
        )
    console.print(
        f"wrote {report.output} ({report.bytes_written / 1e9:.2f} GB, MoE layers {report.moe_layers}) in {report.seconds:.1f} s"
    )
