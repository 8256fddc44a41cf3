"""`moekit calibrate-router`: per-modality prototype router rows for an already converted MoE checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from moekit.cli.common import fail_on_errors


@fail_on_errors
def calibrate_router(
    checkpoint: Path = typer.Argument(..., help="a moekit MoE checkpoint (rewritten in place unless -o)"),
    data: list[Path] = typer.Option(..., "--data", help="calibration samples (LLaVA-style JSON/JSONL); repeatable"),
    output: Path = typer.Option(None, "-o", "--output", help="write the calibrated checkpoint here instead"),
    max_samples: int = typer.Option(64, "--max-samples", help="samples read from each data file"),
    batch_size: int = typer.Option(4, "--batch-size"),
    scale: float = typer.Option(None, "--scale", help="router row length (default: the spec's router.prototype_scale)"),
) -> None:
    """Point each expert's router row at the mean MoE-layer input of its modality (experts named text / image /
    video / 3d, or with `modality` set); other experts keep their rows. No forward pass is needed at conversion."""
    import torch

    from moekit.data import Collator, DataConfig, Preprocessor, build_dataset, split_batch
    from moekit.modeling.load import load
    from moekit.upcycle.router_init import calibrate_router as calibrate

    missing = [str(p) for p in data if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--data: no such file(s): {missing}")
    model = load(checkpoint).eval()
    config = DataConfig(
        datasets=[{"name": p.stem, "path": str(p), "max_samples": max_samples} for p in data], bad_samples="skip"
    )
    preprocessor = Preprocessor.from_dir(checkpoint)
    dataset = build_dataset(config, preprocessor)
    collate = Collator(preprocessor.pad_id)

    def batches():
        items = [dataset[i] for i in range(len(dataset))]
        for start in range(0, len(items), batch_size):
            inputs, extras = split_batch(collate(items[start : start + batch_size]))
            inputs.pop("labels", None)
            yield {**inputs, "sample_modalities": extras["sample_modalities"]}

    with torch.no_grad():
        updated = calibrate(model, batches(), scale)
    model.save_pretrained(output or checkpoint)
    for layer, experts in sorted(updated.items()):
        typer.echo(f"layer {layer}: router rows set for {', '.join(experts)}")
    typer.echo(f"wrote {output or checkpoint}")
