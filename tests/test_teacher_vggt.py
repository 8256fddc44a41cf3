"""VGGT teacher: loading the released key layout, alternating attention, RoPE, preprocessing, errors."""

import pytest
import torch

from moekit.attach.teachers import TeacherBatch
from moekit.config import ConfigError
from moekit.plugins.registry import registry
from moekit_plugins.teachers.vggt.checkpoint import load_aggregator
from moekit_plugins.teachers.vggt.layers import Rope2D
from tests.teacher_helpers import TINY_VGGT, TINY_VGGT_PARAMS, random_aggregator, vggt_checkpoint


def build(checkpoint, **params):
    return registry().build("teacher", "vggt", {**TINY_VGGT_PARAMS, "checkpoint": str(checkpoint), **params})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return vggt_checkpoint(tmp_path_factory.mktemp("vggt") / "model.safetensors")


def frames(batch=1, count=3, height=28, width=28, seed=0):
    return torch.rand(batch, count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_loads_released_layout_and_matches_the_written_weights(ckpt):
    model = load_aggregator(ckpt, TINY_VGGT)
    reference = random_aggregator()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    x = frames()
    with torch.no_grad():
        got, _ = model(x)
        want, _ = reference(x)
    torch.testing.assert_close(got[-1][1], want[-1][1])


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_loads_a_pytorch_file_and_a_folder(tmp_path, suffix):
    file = vggt_checkpoint(tmp_path / f"model{suffix}")
    out = build(file).features(TeacherBatch(frames()))
    assert out.features.shape == (1, 3 * 16, 32)
    folder = tmp_path / "dir"
    vggt_checkpoint(folder / "model.safetensors")
    torch.testing.assert_close(build(folder).features(TeacherBatch(frames())).features, out.features)


@pytest.mark.parametrize(
    ("params", "tokens", "dim"),
    [
        ({}, 3 * 16, 32),  # patch tokens, frame and global outputs concatenated
        ({"output": "global"}, 3 * 16, 16),
        ({"output": "frame", "tokens": "all"}, 3 * (16 + 3), 16),
        ({"pooling": "mean"}, 1, 32),
        ({"pooling": "tokens", "pool_tokens": 6}, 6, 32),
        ({"num_frames": 2}, 2 * 16, 32),
    ],
)
def test_feature_shapes(ckpt, params, tokens, dim):
    teacher = build(ckpt, **params)
    out = teacher.features(TeacherBatch(frames(batch=2)))
    assert out.features.shape == (2, tokens, dim)
    assert out.dim == teacher.dim == dim
    assert out.grid == (min(3, params.get("num_frames", 3)), 4, 4)


def test_output_is_the_last_layers_patch_tokens(ckpt):
    teacher = build(ckpt)
    x = frames()
    out = teacher.features(TeacherBatch(x)).features
    with torch.no_grad():
        outputs, _ = teacher.model(x)
    frame_out, global_out = outputs[-1]
    special = TINY_VGGT.special_tokens
    expected = torch.cat([frame_out, global_out], dim=-1)[:, :, special:].flatten(1, 2)
    torch.testing.assert_close(out, expected)


def test_frames_mix_only_through_global_attention(ckpt):
    model = load_aggregator(ckpt, TINY_VGGT)
    a = frames(count=3, seed=1)
    b = a.clone()
    b[:, 2] = torch.rand(3, 28, 28)  # change the last frame only
    with torch.no_grad():
        out_a, _ = model(a, [0, 1])
        out_b, _ = model(b, [0, 1])
    # layer 0: the frame block sees one frame, so frame 0's tokens ignore frame 2; the global block does not.
    torch.testing.assert_close(out_a[0][0][:, 0], out_b[0][0][:, 0], rtol=0, atol=0)
    assert not torch.allclose(out_a[0][1][:, 0], out_b[0][1][:, 0], atol=1e-4)
    # layer 1's frame block reads what global block 0 mixed in.
    assert not torch.allclose(out_a[1][0][:, 0], out_b[1][0][:, 0], atol=1e-4)
    # With the global blocks silenced (layer scale 0 makes them identities) nothing crosses frames at all.
    with torch.no_grad():
        for block in model.global_blocks:
            block.ls1.gamma.zero_()
            block.ls2.gamma.zero_()
        quiet_a, _ = model(a, [1])
        quiet_b, _ = model(b, [1])
    torch.testing.assert_close(quiet_a[1][1][:, :2], quiet_b[1][1][:, :2], rtol=0, atol=0)


def test_later_frames_are_interchangeable_but_the_first_is_the_reference(ckpt):
    """Frames 1.. share one learnt camera/register token set and carry no frame index, so permuting them permutes
    the output; frame 0 has its own tokens."""
    model = load_aggregator(ckpt, TINY_VGGT)
    x = frames(count=3, seed=2)
    with torch.no_grad():
        out, _ = model(x)
        swapped, _ = model(x[:, [0, 2, 1]])
        first_swapped, _ = model(x[:, [1, 0, 2]])
    torch.testing.assert_close(swapped[-1][1], out[-1][1][:, [0, 2, 1]], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first_swapped[-1][1], out[-1][1][:, [1, 0, 2]], atol=1e-3)


def test_rope_is_relative_and_norm_preserving():
    rope = Rope2D(100.0)
    q, k = torch.randn(2, 1, 1, 8, dtype=torch.float64).unbind(0)
    q, k = q[None], k[None]

    def score(p, r):
        pos_q = torch.tensor([[p]])
        pos_k = torch.tensor([[r]])
        return (rope(q, pos_q) * rope(k, pos_k)).sum()

    torch.testing.assert_close(score((3, 5), (1, 2)), score((7, 9), (5, 6)))  # same offset (2, 3)
    assert not torch.allclose(score((3, 5), (1, 2)), score((3, 5), (2, 2)))
    torch.testing.assert_close(rope(q, torch.tensor([[[4, 11]]])).norm(), q.norm())


def test_dino_position_table_is_resized_for_other_grids(ckpt):
    model = load_aggregator(ckpt, TINY_VGGT)
    native = model.patch_embed._positions(4, 4)
    torch.testing.assert_close(native, model.patch_embed.pos_embed)
    assert model.patch_embed._positions(2, 6).shape == (1, 1 + 12, 16)


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [
        ("crop", (20, 40), (14, 28)),  # width to 28, height 14 (a patch multiple)
        ("crop", (60, 20), (28, 28)),  # height 84 after scaling, centre-cropped to 28
        ("pad", (60, 20), (28, 28)),
    ],
)
def test_preprocess_sizes(ckpt, mode, size, expected):
    teacher = build(ckpt, resize=mode)
    x = torch.full((1, 2, 3, *size), 0.25)
    out = teacher.preprocess(x)
    assert out.shape[-2:] == expected
    if mode == "pad":  # a 60x20 frame becomes 28x7 (9.33 rounded to the patch): white bars left and right
        assert torch.all(out[..., :10] == 1.0) and torch.allclose(out[..., 14], torch.tensor(0.25))


def test_single_image_is_a_one_frame_scene(ckpt):
    teacher = build(ckpt)
    image = torch.rand(2, 3, 28, 28)
    out = teacher.features(TeacherBatch(image))
    assert out.features.shape == (2, 16, 32) and out.frames_used == (0,)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    gone = "aggregator.frame_blocks.1.attn.qkv.weight"
    extra = "aggregator.global_blocks.7.attn.qkv.weight"
    file = vggt_checkpoint(tmp_path / "a.safetensors", drop=[gone], add={extra: torch.zeros(3)})
    with pytest.raises(ValueError, match="missing keys") as info:
        load_aggregator(file, TINY_VGGT)
    assert gone in str(info.value) and extra in str(info.value) and "unexpected keys" in str(info.value)


def test_keys_outside_aggregator_and_heads_are_named(tmp_path):
    file = vggt_checkpoint(tmp_path / "b.pt", add={"decoder.bogus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys outside .*decoder\.bogus\.weight"):
        load_aggregator(file, TINY_VGGT)


def test_wrong_sizes_name_the_tensor_and_shapes(ckpt):
    with pytest.raises(
        ValueError, match=r"aggregator\.camera_token \(checkpoint \[1, 2, 1, 16\], model \[1, 2, 1, 32\]\)"
    ):
        load_aggregator(ckpt, TINY_VGGT.model_copy(update={"embed_dim": 32}))


def test_bad_params_are_located(tmp_path, ckpt):
    with pytest.raises(ConfigError, match=r"checkpoint: checkpoint path .*nowhere.* does not exist"):
        build(tmp_path / "nowhere.pt")
    with pytest.raises(ConfigError, match="layer=5 does not exist"):
        build(ckpt, layer=5)
    with pytest.raises(ConfigError, match="multiple of arch.patch_size"):
        build(ckpt, image_size=30)
    with pytest.raises(ConfigError, match="unknown key"):
        build(ckpt, heads="yes")


def test_released_sizes_give_the_released_layout():
    from moekit_plugins.teachers.vggt.aggregator import Aggregator
    from moekit_plugins.teachers.vggt.config import VGGTArch

    with torch.device("meta"):
        state = Aggregator(VGGTArch()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["patch_embed.pos_embed"] == (1, 1 + 37 * 37, 1024)  # DINOv2 ViT-L/14 at 518
    assert shapes["register_token"] == (1, 2, 4, 1024) and shapes["camera_token"] == (1, 2, 1, 1024)
    assert shapes["global_blocks.23.attn.k_norm.weight"] == (64,) and "global_blocks.24.ls1.gamma" not in shapes
    assert (
        shapes["patch_embed.blocks.23.ls2.gamma"] == (1024,) and "patch_embed.blocks.0.attn.q_norm.weight" not in shapes
    )
    dino = sum(v.numel() for k, v in state.items() if k.startswith("patch_embed."))
    assert dino == 304_372_736  # ViT-L/14 with 4 registers
    assert sum(v.numel() for v in state.values()) == 909_112_320


def test_a_plain_patch_convolution_instead_of_dinov2(tmp_path):
    arch = TINY_VGGT.model_copy(update={"patch_embed": "conv"})
    file = vggt_checkpoint(tmp_path / "conv.safetensors", arch=arch)
    params = {**TINY_VGGT_PARAMS, "arch": arch.model_dump(), "checkpoint": str(file)}
    teacher = registry().build("teacher", "vggt", params)
    assert "patch_embed.proj.weight" in teacher.model.state_dict()
    assert teacher.features(TeacherBatch(frames())).features.shape == (1, 48, 32)


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_unreadable_files_are_named(tmp_path, name):
    file = tmp_path / name
    file.write_bytes(b"not a checkpoint")
    with pytest.raises(
        ValueError, match=rf"{name}: (cannot be read as a PyTorch state dict|not a readable safetensors)"
    ):
        load_aggregator(file, TINY_VGGT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"no VGGT checkpoint file in this folder \(looked for model.safetensors"
    ):
        load_aggregator(tmp_path / "empty", TINY_VGGT)
