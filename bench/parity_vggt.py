"""Parity of moekit's VGGT aggregator with the reference implementation (github.com/facebookresearch/vggt).

    python bench/parity_vggt.py --reference ~/src/vggt            # released sizes: key list, then 2 frames at 518
    python bench/parity_vggt.py --reference ~/src/vggt --tiny     # reduced sizes, same structure (seconds on a CPU)
    python bench/parity_vggt.py --reference ~/src/vggt --write-keys tests/fixtures/vggt_keys.json

PATH is a checkout of the reference that the user provides (the folder holding its `vggt/` package); it is imported
at run time and nothing of it is copied into moekit. Two checks:

- key list: the released model (`VGGT()`, heads included) is built without allocating weights; moekit's checkpoint
  selection must keep exactly its `aggregator.*` tensors, ignore the heads, and find every name and shape that an
  `Aggregator(VGGTArch())` expects, and `VGGTArch()` must equal the reference Aggregator's defaults.
- outputs: a reference `Aggregator` gets random weights (`randomize`: every tensor re-drawn, so layer scales, norms,
  position table and special tokens all matter), its state dict goes through moekit's key selection and strict
  check into moekit's aggregator, and both run the same multi-frame fp32 input; every layer's frame-block and
  global-block outputs are compared (the reference concatenates them on channels), and the DINOv2 patch tokens.

`--write-keys` records the key list, the reference's defaults, its commit and golden statistics of the `--tiny`
reference outputs: `tests/test_vggt_parity.py` checks moekit against them without the reference (moekit's
parameter names are the reference's, so `randomize` draws the same weights in both). Exit status 1 when a key check
fails or a difference exceeds `--atol`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from moekit_plugins.teachers.vggt.aggregator import Aggregator
from moekit_plugins.teachers.vggt.checkpoint import HEADS, check_state, split_keys
from moekit_plugins.teachers.vggt.config import VGGTArch

REPOSITORY = "facebookresearch/vggt"
# The reference's DINOv2 choices: (embed_dim, depth, heads); vit_giant2 (SwiGLU FFN) has no moekit counterpart.
DINO = {"dinov2_vitl14_reg": (1024, 24, 16), "dinov2_vitb14_reg": (768, 12, 12), "dinov2_vits14_reg": (384, 12, 6)}
# Reduced reference sizes with the released structure; each runs on square and non-square frames.
TINY = {
    "conv": dict(img_size=56, embed_dim=64, depth=3, num_heads=4, patch_embed="conv"),
    "conv-aa2": dict(img_size=56, embed_dim=64, depth=4, num_heads=4, patch_embed="conv", aa_block_size=2),
    "dinov2-vits14": dict(img_size=56, embed_dim=384, depth=2, num_heads=6, patch_embed="dinov2_vits14_reg"),
}
TINY_INPUTS = ((2, 3, 56, 56), (2, 3, 42, 70))  # [B, S, H, W]; 4x4 patches: the position table as trained; 3x5
FULL_INPUTS = ((1, 2, 518, 518), (1, 2, 392, 518))  # square, and VGGT's `crop` preprocessing of a 4:3 image
SEED = 0
SAMPLES = 16  # golden values kept per output


def import_reference(path: Path):
    """The reference's aggregator and model modules from PATH (refusing copies found elsewhere on sys.path)."""
    if not (path / "vggt" / "models" / "aggregator.py").is_file():
        raise SystemExit(f"{path}: not a checkout of {REPOSITORY} (no vggt/models/aggregator.py)")
    sys.path.insert(0, str(path))
    modules = importlib.import_module("vggt.models.aggregator"), importlib.import_module("vggt.models.vggt")
    for module in modules:  # `vggt` is a namespace package: an installed copy could shadow the checkout
        if path.resolve() not in Path(module.__file__).resolve().parents:
            raise SystemExit(f"`import {module.__name__}` found {module.__file__}, not the checkout at {path}")
    return modules


def reference_commit(path: Path, given: str | None) -> str:
    if given:
        return given
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout; pass --reference-commit)"


@contextlib.contextmanager
def empty_weights():
    """Parameters and buffers go to the meta device as modules register them (no weight memory; initialisers do
    nothing), while other tensors stay real: under `torch.device("meta")` the reference's
    `torch.linspace(...).item()` fails."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer(module, name, tensor, persistent=True):
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def reference_defaults(aggregator_cls) -> dict:
    """The reference Aggregator's plain-valued constructor defaults."""
    sig = inspect.signature(aggregator_cls).parameters
    plain = (int, float, bool, str, list)
    return {name: p.default for name, p in sig.items() if isinstance(p.default, plain)}


def arch_for(kwargs: dict, defaults: dict) -> VGGTArch:
    """moekit's sizes for the reference Aggregator built with `kwargs` (over its `defaults`)."""
    kw = {**defaults, **kwargs}
    if kw["aa_order"] != ["frame", "global"] or not (kw["qkv_bias"] and kw["proj_bias"] and kw["ffn_bias"]):
        raise SystemExit("moekit's aggregator runs frame then global blocks, with biases")
    fields = dict(
        img_size=kw["img_size"],
        patch_size=kw["patch_size"],
        embed_dim=kw["embed_dim"],
        depth=kw["depth"],
        num_heads=kw["num_heads"],
        mlp_ratio=kw["mlp_ratio"],
        num_register_tokens=kw["num_register_tokens"],
        qk_norm=kw["qk_norm"],
        rope_freq=float(kw["rope_freq"]),
        layer_scale=bool(kw["init_values"]),
        aa_block_size=kw["aa_block_size"],
    )
    if "conv" in kw["patch_embed"]:
        return VGGTArch(**fields, patch_embed="conv", dino_num_heads=kw["num_heads"])
    dim, depth, heads = DINO[kw["patch_embed"]]
    if dim != kw["embed_dim"]:
        raise SystemExit(f"{kw['patch_embed']} is {dim} wide: the reference needs embed_dim={dim}")
    return VGGTArch(**fields, patch_embed="dinov2", dino_depth=depth, dino_num_heads=heads)


def released_keys(model_cls) -> dict[str, list[int]]:
    """Name -> shape of every tensor of the released checkpoint, from the reference's module tree (`VGGT()`)."""
    with empty_weights():
        model = model_cls()
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def to_moekit(state: dict, arch: VGGTArch, source: str) -> tuple[Aggregator, dict[str, int]]:
    """moekit's aggregator holding the full-model tensors `state` (or meta tensors of the shapes it lists), through
    the loader's own key selection (`aggregator.*` kept, heads ignored, anything else refused) and strict check."""
    state = {k: v if isinstance(v, torch.Tensor) else torch.empty(v, device="meta") for k, v in state.items()}
    chosen, other = split_keys(list(state), Path(source))
    if other:
        raise ValueError(f"{source}: unexpected keys outside the aggregator and the VGGT heads: {sorted(other)[:12]}")
    with torch.device("meta"):
        model = Aggregator(arch)
    picked = {name: state[key] for name, key in chosen.items()}
    check_state(model, picked, source, arch)
    model.load_state_dict(picked, strict=True, assign=True)
    heads = sum(k.startswith(HEADS) for k in state)
    return model.eval(), {"keys": len(state), "aggregator": len(picked), "heads_ignored": heads}


def randomize(model: nn.Module, seed: int = SEED) -> None:
    """Re-draw every parameter, in name order, so no part of the forward is inert (the constructors leave layer
    scales at 0.01 or 1, norms at identity, DINOv2 biases at 0 and the special tokens near 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma":
                value = torch.rand(p.shape, generator=gen) * 0.4 + 0.1
            elif p.ndim == 1 and leaf == "weight":
                value = 1 + 0.2 * torch.randn(p.shape, generator=gen)
            elif p.ndim == 1:
                value = 0.1 * torch.randn(p.shape, generator=gen)
            elif leaf == "weight":
                value = torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5
            else:  # camera / register / cls tokens, position table, mask token
                value = 0.5 * torch.randn(p.shape, generator=gen)
            p.copy_(value)


def frames(shape: tuple[int, int, int, int], seed: int = SEED) -> torch.Tensor:
    batch, count, height, width = shape
    return torch.rand(batch, count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def golden(outputs: list[torch.Tensor]) -> dict:
    """A few facts of per-layer `[B, S, P, 2C]` outputs: mean |x| of each layer, SAMPLES values of the last one."""
    last = outputs[-1].flatten()
    picks = torch.randperm(last.numel(), generator=torch.Generator().manual_seed(SEED))[:SAMPLES]
    return {
        "abs_mean": [round(out.abs().mean().item(), 7) for out in outputs],
        "sample_index": picks.tolist(),
        "sample_value": [round(v, 7) for v in last[picks].tolist()],
    }


def moekit_outputs(model: Aggregator, images: torch.Tensor) -> list[torch.Tensor]:
    """moekit's per-layer outputs in the reference's form: frame and global outputs concatenated on channels."""
    with torch.no_grad():
        outputs, _ = model(images, list(range(model.arch.depth)))
    return [torch.cat(outputs[i], dim=-1) for i in range(model.arch.depth)]


def compare(ref: nn.Module, ours: Aggregator, images: torch.Tensor) -> dict:
    """Max |difference| per compared output, and the largest |value| for scale."""
    arch, dim = ours.arch, ours.arch.embed_dim
    with torch.no_grad():
        ref_out, start = ref(images)
        result: dict = {"input": list(images.shape), "patch_start_idx": [start, arch.special_tokens]}
        if arch.patch_embed == "dinov2":
            flat = ((images - ref._resnet_mean) / ref._resnet_std).flatten(0, 1)
            rows, cols = images.shape[-2] // arch.patch_size, images.shape[-1] // arch.patch_size
            want = ref.patch_embed(flat)["x_norm_patchtokens"]
            result["dinov2_patch_tokens"] = (ours.patch_embed(flat, rows, cols) - want).abs().max().item()
    layers = [
        {
            "layer": i,
            "frame": (mine[..., :dim] - theirs[..., :dim]).abs().max().item(),
            "global": (mine[..., dim:] - theirs[..., dim:]).abs().max().item(),
            "scale": theirs.abs().max().item(),
        }
        for i, (mine, theirs) in enumerate(zip(moekit_outputs(ours, images), ref_out))
    ]
    diffs = [x for entry in layers for x in (entry["frame"], entry["global"])]
    diffs.append(result.get("dinov2_patch_tokens", 0.0))
    result.update(layers=layers, max_abs_diff=max(diffs), max_abs_value=max(e["scale"] for e in layers))
    result["structure_ok"] = start == arch.special_tokens and len(ref_out) == arch.depth
    result["golden"] = golden(ref_out)
    return result


def run_parity(name: str, kwargs: dict, inputs, defaults: dict) -> dict:
    started = time.perf_counter()
    torch.manual_seed(SEED)
    ref = AGG.Aggregator(**kwargs).eval()
    randomize(ref)
    arch = arch_for(kwargs, defaults)
    full = {f"aggregator.{k}": v for k, v in ref.state_dict().items()}
    ours, counts = to_moekit(full, arch, f"reference {name}")
    entry = {"config": name, "reference_kwargs": kwargs, "keys": counts, "runs": []}
    if len(inputs) and ours.arch.depth < 8:  # the tests' premise: randomize() on moekit draws the same weights
        fresh = Aggregator(arch)
        randomize(fresh)
        entry["same_random_weights"] = all(
            torch.equal(v, full[f"aggregator.{k}"]) for k, v in fresh.state_dict().items()
        )
    for shape in inputs:
        result = compare(ref, ours, frames(shape))
        entry["runs"].append(result)
        extra = f", DINOv2 patch tokens {result['dinov2_patch_tokens']:.2e}" if "dinov2_patch_tokens" in result else ""
        print(
            f"{name:>14} {result['input']}: max |diff| {result['max_abs_diff']:.2e} over {len(result['layers'])} "
            f"layers x (frame, global){extra}; outputs up to {result['max_abs_value']:.1f}"
        )
    entry["seconds"] = round(time.perf_counter() - started, 1)
    return entry


def write_fixture(path: Path, reference: dict, defaults: dict, shapes: dict, tiny: list[dict]) -> None:
    """The fixture: provenance, defaults, tiny golden values, then the key list one key per line."""
    cases = [
        {"config": e["config"], "reference_kwargs": e["reference_kwargs"], "frames": shape, **run["golden"]}
        for e in tiny
        for shape, run in zip(TINY_INPUTS, e["runs"])
    ]
    head = {"reference": reference, "aggregator_defaults": defaults, "seed": SEED}
    lines = [json.dumps(head, indent=1)[:-2] + ',\n "tiny_golden": [']
    lines += [f"  {json.dumps(case)}," for case in cases]
    lines[-1] = lines[-1].rstrip(",")
    lines += [' ],\n "keys": {']
    lines += [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in shapes.items()]
    lines[-1] = lines[-1].rstrip(",")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n }\n}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help=f"checkout of {REPOSITORY}")
    parser.add_argument("--reference-commit", help="recorded commit when PATH is not a git checkout")
    parser.add_argument("--tiny", action="store_true", help="reduced sizes instead of the released VGGT-1B")
    parser.add_argument("--write-keys", type=Path, help="write the key list, defaults and tiny golden values here")
    parser.add_argument("--no-outputs", action="store_true", help="only the key-list check")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--json", type=Path, help="write the full report here")
    args = parser.parse_args(argv)

    global AGG
    AGG, model_module = import_reference(args.reference)
    reference = {"repository": REPOSITORY, "commit": reference_commit(args.reference, args.reference_commit)}
    report: dict = {"reference": reference, "torch": torch.__version__}
    print(f"reference {REPOSITORY} @ {reference['commit']}")

    defaults = reference_defaults(AGG.Aggregator)
    shapes = released_keys(model_module.VGGT)
    _, counts = to_moekit(shapes, VGGTArch(), "released VGGT() key list")
    same_defaults = arch_for({}, defaults) == VGGTArch()
    report["key_list"] = {**counts, "moekit_defaults_match": same_defaults}
    print(
        f"key list: {counts['keys']} tensors; VGGTArch() accepts the {counts['aggregator']} aggregator tensors "
        f"(names and shapes), {counts['heads_ignored']} head tensors ignored; defaults equal: {same_defaults}"
    )
    ok = same_defaults
    runs = []
    if args.tiny or args.write_keys:
        runs += [run_parity(name, kwargs, TINY_INPUTS, defaults) for name, kwargs in TINY.items()]
    if not args.tiny and not args.no_outputs:
        runs.append(run_parity("vggt-1b", {}, FULL_INPUTS, defaults))
    if args.write_keys:
        write_fixture(args.write_keys, reference, defaults, shapes, runs[: len(TINY)])
        print(f"wrote {args.write_keys}")
    if runs:
        worst = max(run["max_abs_diff"] for entry in runs for run in entry["runs"])
        ok = ok and worst <= args.atol
        ok = ok and all(run["structure_ok"] for e in runs for run in e["runs"])
        ok = ok and all(e.get("same_random_weights", True) for e in runs)
        print(f"worst max |diff| {worst:.2e} (atol {args.atol:g})")
    for entry in runs:
        for run in entry["runs"]:
            run.pop("golden")
    report["parity"] = runs
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


AGG = None  # the reference's vggt.models.aggregator, imported by main()

if __name__ == "__main__":
    sys.exit(main())
