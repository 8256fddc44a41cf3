"""`moekit calibrate-router`: per-modality prototype router rows for an already converted MoE checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer


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

    from moekit.attach.position import feeding
    from moekit.data import Collator, DataConfig, build_dataset, split_batch
    from moekit.evaluate.model_dir import open_model_dir
    from moekit.upcycle.router_init import calibrate_router as calibrate

    missing = [str(p) for p in data if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--data: no such file(s): {missing}")
    opened = open_model_dir(checkpoint, moe=True)
    config = DataConfig(
        datasets=[{"name": p.stem, "path": str(p), "max_samples": max_samples} for p in data], bad_samples="skip"
    )
    dataset = build_dataset(config, opened.preprocessor)
    collate = Collator(opened.preprocessor.pad_id)

    def batches():
        # Each batch is handed over only while its geometry feeds the checkpoint's position encoders.
        items = [dataset[i] for i in range(len(dataset))]
        for start in range(0, len(items), batch_size):
            inputs, extras = split_batch(collate(items[start : start + batch_size]))
            inputs.pop("labels", None)
            with feeding(opened.encoders, opened.model, inputs["input_ids"], extras.get("geometry")):
                yield {**inputs, "sample_modalities": extras["sample_modalities"]}

    with torch.no_grad():
        updated = calibrate(opened.model, batches(), scale)
    opened.model.save_pretrained(output or checkpoint)
    for layer, experts in sorted(updated.items()):
        typer.echo(f"layer {layer}: router rows set for {', '.join(experts)}")
    typer.echo(f"wrote {output or checkpoint}")
