"""Decoding speed with NEO-ov's native RoPE (`neo_native_rope`): the KV cache against recomputing the sequence.

A Qwen2.5-VL of `--hidden` / `--layers` (random weights, the tiny vision tower) with the encoder attached and
trained-like H/W keys; one prompt of `--text` text tokens around an image of `--image`x`--image` pixels, greedy,
`--new-tokens` new tokens (no early stop). Both ways run inside `feed_batch`, as moekit's `generate` does: with the
cache (now) and with `use_cache=False` (how it decoded before: one whole forward per new token). Repeats
interleave; medians. The two must produce the same tokens.

    python bench/neo_decode.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_rank  # noqa: E402  (a sibling script: the same model config)


def build(hidden: int, layers: int):
    import transformers

    import moekit.plugins.registry as registry

    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(memory_rank.qwen_config(layers, hidden)).eval()
    encoder = registry.registry().build("position_encoder", "neo_native_rope", {}, model=model)
    for k in encoder.k_hw:
        torch.nn.init.normal_(k.weight, std=0.02)
    return model, encoder


def prompt(model, text_len: int, pixels: int) -> dict[str, torch.Tensor]:
    """Text, an image (its merged tokens between vision start/end), text: the inputs the model's processor builds."""
    from moekit.demo.tiny import IMAGE_ID, VISION_END_ID, VISION_START_ID

    vision = model.config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    side = pixels // patch
    grid = torch.tensor([[1, side, side]])
    values = torch.randn(side * side, vision.in_channels * vision.temporal_patch_size * patch * patch)
    visual = (side // merge) ** 2
    words = torch.randint(3, IMAGE_ID - 10, (text_len,))
    ids = torch.cat(
        [
            words[: text_len // 2],
            torch.tensor([VISION_START_ID]),
            torch.full((visual,), IMAGE_ID),
            torch.tensor([VISION_END_ID]),
            words[text_len // 2 :],
        ]
    )[None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": values,
        "image_grid_thw": grid,
        "mm_token_type_ids": (ids == IMAGE_ID).long(),
    }


def timed(model, encoder, batch, new_tokens: int, cache: bool) -> tuple[float, list[int]]:
    from moekit.attach.position import feeding

    with torch.no_grad(), feeding({"neo": encoder}, model, batch["input_ids"], None):
        start = time.perf_counter()
        out = model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=cache
        )
        seconds = time.perf_counter() - start
    return seconds, out[0, batch["input_ids"].shape[1] :].tolist()


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--text", type=int, default=256)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, encoder = build(args.hidden, args.layers)
    batch = prompt(model, args.text, args.image)
    timed(model, encoder, batch, 2, True)  # warm-up
    runs: dict[str, list[float]] = {"cache": [], "recompute": []}
    tokens = {}
    for repeat in range(args.repeats):
        for name in ("cache", "recompute") if repeat % 2 == 0 else ("recompute", "cache"):
            seconds, tokens[name] = timed(model, encoder, batch, args.new_tokens, name == "cache")
            runs[name].append(seconds)
            print(f"repeat {repeat + 1} {name}: {seconds:.2f} s", flush=True)
    length = batch["input_ids"].shape[1]
    print(f"\n{cpu()}, torch {torch.__version__}, 2 threads, fp32")
    print(f"prompt {length} tokens, {args.new_tokens} new, hidden {args.hidden}, {args.layers} layers")
    print("| decoding | s (median) | new tokens/s |")
    print("| --- | ---: | ---: |")
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        print(f"| {name} | {median:.2f} | {args.new_tokens / median:.1f} |")
    speedup = statistics.median(runs["recompute"]) / statistics.median(runs["cache"])
    print(f"cache / recompute speed: {speedup:.1f}x; same tokens: {tokens['cache'] == tokens['recompute']}")


if __name__ == "__main__":
    main()
