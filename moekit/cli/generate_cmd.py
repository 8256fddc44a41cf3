"""`moekit generate MODEL --prompt TEXT [--image F]... [--video F|DIR] [--scene DIR]`: ask a model one question."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def generate(
    model: Path = typer.Argument(..., help="model folder (dense or moekit MoE)"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="the question; <image> / <video> mark where media go"),
    image: list[Path] = typer.Option([], "--image", help="an image file (repeatable, in prompt order)"),
    video: Path = typer.Option(None, "--video", help="a video file or a folder of frames"),
    scene: Path = typer.Option(None, "--scene", help="a ScanNet-style 3D scene folder (frames, depth, poses)"),
    system: str = typer.Option(None, "--system", help="a system prompt"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="at most this many new tokens"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy (deterministic)"),
    seed: int = typer.Option(0, "--seed", help="sampling seed (with --temperature > 0)"),
    max_frames: int = typer.Option(32, "--max-frames", min=1, help="frames sampled from a video or scene"),
    synergy: bool = typer.Option(False, "--synergy", help="put the model's synergy tokens after the last image"),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="folder with the tokenizer (default: MODEL)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON record (prompt, media, answer, settings)"),
) -> None:
    """Generate MODEL's answer: the chat template, media through the training preprocessing (position encoders
    fed a scene's geometry), KV cache; greedy unless --temperature is set."""
    from moekit.data.config import FramesSpec
    from moekit.evaluate.generate import Sampling, generate_batch, make_request
    from moekit.evaluate.model_dir import open_model_dir

    for path in [*image, video, scene]:
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
    frames = FramesSpec(max_frames=max_frames)
    request = make_request(prompt, images=image, video=video, scene=scene, system=system, frames=frames)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    opened = open_model_dir(model, tokenizer)
    answer = generate_batch(opened, [request], sampling, synergy=synergy)[0]
    if as_json:
        record = {
            "model": str(model),
            "prompt": prompt,
            "system": system,
            "images": [str(p) for p in image],
            "video": None if video is None else str(video),
            "scene": None if scene is None else str(scene),
            "answer": answer,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        typer.echo(json.dumps(record))
    else:
        typer.echo(answer)
