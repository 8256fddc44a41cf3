"""V-JEPA 2 teacher on a tiny random VJEPA2Model saved with save_pretrained and loaded from its local folder."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.attach.teachers import TeacherBatch
from moekit.config import ConfigError
from moekit.plugins.registry import registry
from moekit_plugins.teachers.common import IMAGENET_MEAN, pool
from tests.teacher_helpers import vjepa2_checkpoint

NUM_FRAMES = 4
TOKENS = (NUM_FRAMES // 2) * (16 // 4) ** 2  # tubelets x patches per frame = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return vjepa2_checkpoint(tmp_path_factory.mktemp("vjepa2") / "tiny")


def build(checkpoint, **params):
    return registry().build("teacher", "vjepa2", {"checkpoint": str(checkpoint), "num_frames": NUM_FRAMES, **params})


def clip(batch=2, frames=NUM_FRAMES, size=16, seed=0):
    return torch.rand(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_features_are_the_encoder_tokens(ckpt):
    teacher = build(ckpt)
    x = clip()
    out = teacher.features(TeacherBatch(x))
    assert out.features.shape == (2, TOKENS, 24) and teacher.dim == 24
    assert out.grid == (2, 4, 4) and out.frames_used == (0, 1, 2, 3) and out.name == "vjepa2"
    with torch.no_grad():
        expected = teacher.model(pixel_values_videos=teacher.preprocess(x), skip_predictor=True).last_hidden_state
    torch.testing.assert_close(out.features, expected)


def test_a_single_image_is_repeated_into_a_clip(ckpt):
    teacher = build(ckpt)
    image = torch.rand(2, 3, 16, 16)
    out = teacher.features(TeacherBatch(image))
    assert out.features.shape == (2, TOKENS, 24) and out.frames_used == (0,) * NUM_FRAMES
    repeated = teacher.features(TeacherBatch(image[:, None].expand(-1, NUM_FRAMES, -1, -1, -1)))
    torch.testing.assert_close(out.features, repeated.features)


def test_longer_clips_are_sampled_uniformly(ckpt):
    teacher = build(ckpt)
    x = clip(batch=1, frames=8)
    out = teacher.features(TeacherBatch(x))
    assert out.frames_used == (0, 2, 5, 7)
    torch.testing.assert_close(out.features, teacher.features(TeacherBatch(x[:, [0, 2, 5, 7]])).features)


def test_pooling_is_numerically_right(ckpt):
    x = clip()
    full = build(ckpt).features(TeacherBatch(x)).features
    mean = build(ckpt, pooling="mean").features(TeacherBatch(x))
    torch.testing.assert_close(mean.features, full.mean(dim=1, keepdim=True))
    assert mean.pooling == "mean"
    tokens = build(ckpt, pooling="tokens", pool_tokens=8).features(TeacherBatch(x))
    torch.testing.assert_close(tokens.features, full.reshape(2, 8, TOKENS // 8, 24).mean(dim=2))
    assert tokens.pooling == "tokens:8" and tokens.grid == (2, 4, 4)


def test_pooling_to_uneven_runs_matches_hand_computed_averages():
    x = torch.arange(10, dtype=torch.float32).view(1, 5, 2)  # tokens [0,1] [2,3] [4,5] [6,7] [8,9]
    out = pool(x, "tokens", 2)  # runs {0,1,2} and {2,3,4}, as adaptive pooling splits 5 into 2
    torch.testing.assert_close(out, torch.tensor([[[2.0, 3.0], [6.0, 7.0]]]))
    with pytest.raises(ValueError, match="pool_tokens=6 needs at least that many tokens"):
        pool(x, "tokens", 6)


def test_frames_of_any_size_are_resized_and_normalised(ckpt):
    teacher = build(ckpt)
    gray = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1).expand(1, 2, 3, 24, 40)
    prepared = teacher.preprocess(gray)
    assert prepared.shape == (1, 2, 3, 16, 16)
    torch.testing.assert_close(prepared, torch.zeros_like(prepared), atol=1e-6, rtol=0)
    squash = build(ckpt, resize="squash").preprocess(torch.rand(1, 2, 3, 24, 40))
    assert squash.shape == (1, 2, 3, 16, 16)


def test_mean_and_std_come_from_the_checkpoint_when_it_has_them(tmp_path):
    folder = vjepa2_checkpoint(tmp_path / "m")
    (folder / "video_preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    )
    teacher = build(folder)
    assert teacher.mean == (0.5,) * 3 and teacher.std == (0.25,) * 3


def test_missing_and_unexpected_keys_are_named(tmp_path):
    folder = vjepa2_checkpoint(tmp_path / "broken")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    del state["encoder.layer.1.mlp.fc1.weight"]
    state["encoder.layer.9.bogus"] = torch.zeros(2)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        build(folder)
    message = str(info.value)
    assert "missing keys: encoder.layer.1.mlp.fc1.weight" in message
    assert "unexpected keys: encoder.layer.9.bogus" in message
    state["encoder.layer.1.mlp.fc1.weight"] = torch.zeros(5, 5)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"shape mismatches: encoder.layer.1.mlp.fc1.weight \(checkpoint \[5, 5\], model \[48, 24\]\)"
    ):
        build(folder)


def test_bad_params_are_located(tmp_path, ckpt):
    with pytest.raises(ConfigError, match=r"checkpoint: checkpoint path .*absent.* does not exist"):
        build(tmp_path / "absent")
    with pytest.raises(ValueError, match="num_frames=3 must be a multiple of the tubelet size 2"):
        build(ckpt, num_frames=3)
    with pytest.raises(ConfigError, match="pool_tokens"):
        build(ckpt, pooling="tokens")
    with pytest.raises(ConfigError, match="resize"):
        build(ckpt, resize="stretch")
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="a folder with config.json"):
        build(file)
