"""VGGT parity without the reference: facts recorded from it by `bench/parity_vggt.py --write-keys`.

The fixture holds the released checkpoint's key list and shapes (from the reference's module tree), the reference
Aggregator's defaults and golden outputs of reduced-size reference aggregators under the script's `randomize`.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from moekit_plugins.teachers.vggt.aggregator import Aggregator
from moekit_plugins.teachers.vggt.config import VGGTArch
from moekit_plugins.teachers.vggt.layers import Rope2D

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "vggt_keys.json").read_text())
KEYS = FIXTURE["keys"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("parity_vggt_bench", ROOT / "bench" / "parity_vggt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_fixture_names_the_reference_commit():
    assert FIXTURE["reference"]["repository"] == "facebookresearch/vggt"
    commit = FIXTURE["reference"]["commit"]
    assert len(commit) == 40 and int(commit, 16) >= 0


def test_default_arch_is_the_reference_default(bench):
    assert bench.arch_for({}, FIXTURE["aggregator_defaults"]) == VGGTArch()


def test_loader_accepts_the_released_key_list_and_shapes(bench):
    model, counts = bench.to_moekit(KEYS, VGGTArch(), "released key list")
    assert counts == {"keys": len(KEYS), "aggregator": 1210, "heads_ignored": len(KEYS) - 1210}
    loaded = {f"aggregator.{k}": list(v.shape) for k, v in model.state_dict().items()}
    assert loaded == {k: v for k, v in KEYS.items() if k.startswith("aggregator.")}


def _shape_changed(keys):
    keys["aggregator.frame_blocks.3.attn.q_norm.weight"] = [32]


def _key_dropped(keys):
    del keys["aggregator.patch_embed.register_tokens"]


def _stray_key(keys):
    keys["aggregator.extra.weight"] = [4]


def _unknown_module(keys):
    keys["point_decoder.weight"] = [4]


@pytest.mark.parametrize(
    ("change", "arch", "message"),
    [
        (_shape_changed, {}, "shape mismatches: aggregator.frame_blocks.3.attn.q_norm.weight"),
        (_key_dropped, {}, "missing keys: aggregator.patch_embed.register_tokens"),
        (_stray_key, {}, "unexpected keys: aggregator.extra.weight"),
        (_unknown_module, {}, "point_decoder.weight"),
        (None, {"depth": 23}, "unexpected keys: aggregator.frame_blocks.23."),
        (None, {"num_register_tokens": 5}, "aggregator.register_token (checkpoint [1, 2, 4, 1024]"),
    ],
)
def test_a_checkpoint_that_differs_is_refused_by_name(bench, change, arch, message):
    keys = dict(KEYS)
    if change:
        change(keys)
    with pytest.raises(ValueError) as info:
        bench.to_moekit(keys, VGGTArch(**arch), "changed key list")
    assert message in str(info.value)


@pytest.mark.parametrize("case", FIXTURE["tiny_golden"], ids=lambda c: f"{c['config']}-{c['frames']}")
def test_tiny_aggregator_reproduces_the_reference_outputs(bench, case):
    """Same random weights as the reference had (same names, same draws), same frames: same outputs."""
    torch.manual_seed(0)
    model = Aggregator(bench.arch_for(case["reference_kwargs"], FIXTURE["aggregator_defaults"])).eval()
    bench.randomize(model, FIXTURE["seed"])
    outputs = bench.moekit_outputs(model, bench.frames(tuple(case["frames"]), FIXTURE["seed"]))
    abs_mean = torch.tensor([out.abs().mean().item() for out in outputs])
    torch.testing.assert_close(abs_mean, torch.tensor(case["abs_mean"]), rtol=0, atol=1e-5)
    values = outputs[-1].flatten()[torch.tensor(case["sample_index"])]
    torch.testing.assert_close(values, torch.tensor(case["sample_value"]), rtol=0, atol=1e-5)


def test_rope_frequencies_are_the_reference_ones_bit_for_bit():
    """VGGT's 2D RoPE turns channel pair i of each half by position / 100^(2i/d); rounding differently (e.g.
    100^(-2i/d)) moves some frequencies by one ulp, which grew to 7e-6 over the released 24 layers."""
    rope, half = Rope2D(100.0), 32
    x = torch.eye(2 * half)[None, None]  # [1, 1, 64 tokens, 64 channels]: token c is channel c's unit vector
    pos = torch.full((1, 2 * half, 2), 37)
    out = rope(x, pos)[0, 0]
    inv_freq = 1.0 / 100.0 ** (torch.arange(0, half, 2).float() / half)
    angles = torch.cat([37.0 * inv_freq] * 2)
    for offset in (0, half):  # rows, then columns
        block = out[offset : offset + half, offset : offset + half]
        torch.testing.assert_close(block.diagonal(), angles.cos(), rtol=0, atol=0)
