"""Position encoders on real (tiny) VLMs: the visual token embeddings change by exactly the encoding."""

import pytest
import torch

import moekit
import moekit.plugins.registry as registry
from moekit.arch import ArchError, TokenLayout, visual_site
from moekit.demo.tiny import IMAGE_ID, VIDEO_ID, tiny_inputs, tiny_model
from moekit_plugins.position import CameraGeometry, PolyV3DEncoder, TemporalFrameEncoder, VidLLMPatchEncoder
from moekit_plugins.position.geometry import rigid_inverse, world_coords
from moekit_plugins.position.sinusoid import sinusoid

from .test_position_geometry import K, analytic_world, pose


def embeddings(model, batch) -> torch.Tensor:
    """What the LLM receives: the input embeddings with the visual tokens scattered in."""
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states[0][0]


def build(name, params=None, **context):
    return registry.registry().build("position_encoder", name, params or {}, **context)


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2_5_vl")


def test_hook_moekit_position_encoders_builtin_polyv_3d_image(qwen):
    """PolyV 3D on a Qwen2.5-VL image: 4 tokens, each 28x28 pixels of a plane 2 m away, seen from a known pose."""
    batch = tiny_inputs("qwen2_5_vl", "image")
    before = embeddings(qwen, batch)
    b = pose().float()
    geometry = CameraGeometry(torch.full((56, 56), 2.0), K, b)
    encoder = build("polyv_3d", {"min_wavelength": 0.1, "max_wavelength": 10.0, "scale": 0.5}, model=qwen)
    try:
        with encoder.inputs(images=[geometry]):
            after = embeddings(qwen, batch)
    finally:
        encoder.remove()
    image = batch["input_ids"][0] == IMAGE_ID
    centres = [(13.5, 13.5), (13.5, 41.5), (41.5, 13.5), (41.5, 41.5)]  # raster order of the 2x2 merged tokens
    coords = torch.stack([analytic_world(i, j, 2.0, K, b.double()) for i, j in centres]).float()
    expected = 0.5 * sinusoid(coords, 32, 0.1, 10.0)
    # float32 sums over 784 pixels move a point by ~1e-6 m; at 2*pi/0.1 rad/m that is ~1e-4 in the features
    torch.testing.assert_close(after[image] - before[image], expected, atol=2e-4, rtol=0)
    world = world_coords(geometry.depth, geometry.intrinsics, geometry.cam_to_world())
    layout = TokenLayout(frames=1, height=56, width=56, grid=(1, 2, 2), frames_per_token=1, block=28)
    exact = encoder.encode(*layout.pool(world, geometry.valid()), 32)
    torch.testing.assert_close(after[image] - before[image], exact, atol=1e-6, rtol=0)
    assert torch.equal(after[~image], before[~image])
    assert torch.equal(embeddings(qwen, batch), before)  # removed: the model is its old self


def test_polyv_3d_video_tokens_average_two_frames(qwen):
    batch = tiny_inputs("qwen2_5_vl", "video")  # 4 frames of 56x56 -> 2 x 2 x 2 tokens
    before = embeddings(qwen, batch)
    poses = torch.stack([pose(t=(0.5 * f, 0.0, 0.0)) for f in range(4)])
    depth = torch.full((4, 56, 56), 3.0)
    depth[2:, :28, :28] = 0  # the first token of the second temporal patch has no depth
    encoder = build("polyv_3d", model=qwen)
    assert isinstance(encoder, PolyV3DEncoder)
    with encoder.inputs(videos=[CameraGeometry(depth, K, poses.float())]):
        after = embeddings(qwen, batch)
    encoder.remove()
    video = batch["input_ids"][0] == VIDEO_ID
    delta = after[video] - before[video]
    token = 1  # t = 0, row 0, column 1: frames 0 and 1, pixel centre (13.5, 41.5)
    point = (analytic_world(13.5, 41.5, 3.0, K, poses[0]) + analytic_world(13.5, 41.5, 3.0, K, poses[1])) / 2
    expected = encoder.encode(point[None].float(), torch.ones(1), 32)[0]
    torch.testing.assert_close(delta[token], expected, atol=2e-4, rtol=0)
    assert torch.equal(delta[4], torch.zeros(32))  # no valid pixel: nothing added
    assert delta[5].abs().sum() > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_polyv_3d_hooks_into_other_video_families(family):
    model = tiny_model(family)
    batch = tiny_inputs(family, "video")
    site, _ = visual_site(model)
    before = embeddings(model, batch)
    video = batch["input_ids"][0] == VIDEO_ID
    if family == "llava_onevision":  # 2 frames of 28x28, each pooled to one token, then a newline token
        frames, side, per_token = 2, 28, [(0,), (1,)]
    else:  # 4 frames of 56x56, 2 x 2 x 2 tokens
        frames, side, per_token = 4, 56, None
    b = pose().float()
    encoder = build("polyv_3d", model=model)
    with encoder.inputs(videos=[CameraGeometry(torch.full((frames, side, side), 2.0), K, b)]):
        after = embeddings(model, batch)
    encoder.remove()
    delta = after[video] - before[video]
    if per_token is not None:
        centre = analytic_world(13.5, 13.5, 2.0, K, b.double()).float()
        expected = encoder.encode(centre[None].expand(2, 3), torch.ones(2), 32)
        torch.testing.assert_close(delta[:2], expected, atol=2e-4, rtol=0)
        assert torch.equal(delta[2], torch.zeros(32))  # the newline token has no position
    else:
        centre = analytic_world(13.5, 13.5, 2.0, K, b.double()).float()
        torch.testing.assert_close(delta[0], encoder.encode(centre[None], torch.ones(1), 32)[0], atol=2e-4, rtol=0)
    assert site.layout == ("pooled_frames" if family == "llava_onevision" else "merged_patches")


def test_bad_inputs_to_a_3d_encoder(qwen):
    batch = tiny_inputs("qwen2_5_vl", "image")
    encoder = build("polyv_3d", model=qwen)
    try:
        small = CameraGeometry(torch.ones(50, 56), K, torch.eye(4))
        with (
            pytest.raises(ValueError, match=r"depth of image 0 has 1 frame\(s\) of 50x56 px, but the vision encoder"),
            encoder.inputs(images=[small]),
        ):
            embeddings(qwen, batch)
        with (
            pytest.raises(ValueError, match=r"geometry for 2 image\(s\) was given, but the forward has 1"),
            encoder.inputs(images=[None, None]),
        ):
            embeddings(qwen, batch)
        with (
            pytest.raises(ValueError, match="geometry was given for videos but the forward passed no such input"),
            encoder.inputs(videos=[None]),
        ):
            embeddings(qwen, batch)
        with (
            pytest.raises(TypeError, match="must be a list of CameraGeometry or None"),
            encoder.inputs(images=[torch.ones(56, 56)]),
        ):
            pass
        with encoder.inputs(images=[None]):  # an image without geometry: nothing added
            assert torch.equal(embeddings(qwen, batch), embeddings(qwen, batch))
    finally:
        encoder.remove()


def test_families_without_a_visual_site_are_refused_with_the_reason():
    with pytest.raises(
        ArchError, match=r"'llava' .*Known for: llava_onevision, qwen2_5_vl, qwen2_vl, qwen3_vl.*plug-in"
    ):
        build("polyv_3d", model=tiny_model("llava"))
    with pytest.raises(ArchError, match="'llama'.*This family has no vision input"):
        build("temporal_frame", model=tiny_model("llama"))
    model = tiny_model("llava_onevision")
    encoder = build("polyv_3d", model=model)
    scene = CameraGeometry(torch.ones(28, 28), K, torch.eye(4))
    with (
        pytest.raises(ArchError, match="image 0: llava_onevision image tokens come from 'anyres' tiles"),
        encoder.inputs(images=[scene]),
    ):
        embeddings(model, tiny_inputs("llava_onevision", "image"))
    encoder.remove()


def test_temporal_frame_embedding_sinusoidal_and_learned(qwen):
    batch = tiny_inputs("qwen2_5_vl", "video")
    before = embeddings(qwen, batch)
    video = batch["input_ids"][0] == VIDEO_ID
    frames = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # 2 temporal patches of 2 x 2 tokens
    encoder = build("temporal_frame", {"scale": 2.0, "max_wavelength": 100.0}, model=qwen)
    delta = embeddings(qwen, batch)[video] - before[video]
    encoder.remove()
    torch.testing.assert_close(delta, 2.0 * sinusoid(frames[:, None].float(), 32, 2.0, 100.0), atol=1e-5, rtol=0)
    assert delta[0].abs().sum() > 0 and not torch.allclose(delta[0], delta[4])
    learned = build("temporal_frame", {"mode": "learned", "init": "normal", "max_frames": 4}, model=qwen)
    delta = embeddings(qwen, batch)[video] - before[video]
    torch.testing.assert_close(delta, learned.table.weight[frames], atol=1e-6, rtol=0)
    images = tiny_inputs("qwen2_5_vl", "image")
    assert torch.equal(embeddings(qwen, images), embeddings(qwen, images) * 1)  # images are left alone
    learned.remove()
    zeros = build("temporal_frame", {"mode": "learned"}, model=qwen)
    assert torch.equal(embeddings(qwen, batch), before)  # zero init: the model is unchanged at first
    assert sum(p.numel() for p in zeros.parameters()) == 256 * 32
    zeros.remove()


def test_temporal_frame_on_llava_onevision_skips_the_newline():
    model = tiny_model("llava_onevision")
    batch = tiny_inputs("llava_onevision", "video")
    before = embeddings(model, batch)
    encoder = build("temporal_frame", {"mode": "learned", "init": "normal", "max_frames": 2}, model=model)
    video = batch["input_ids"][0] == VIDEO_ID
    delta = embeddings(model, batch)[video] - before[video]
    torch.testing.assert_close(delta[:2], encoder.table.weight, atol=1e-6, rtol=0)
    assert torch.equal(delta[2], torch.zeros(32))
    encoder.remove()
    too_long = build("temporal_frame", {"mode": "learned", "max_frames": 1}, model=model)
    with pytest.raises(ValueError, match="a video has 2 temporal positions; max_frames is 1"):
        embeddings(model, batch)
    too_long.remove()


def test_vidllm_3d_patch_adds_an_mlp_of_the_back_projected_point(qwen):
    batch = tiny_inputs("qwen2_5_vl", "image")
    before = embeddings(qwen, batch)
    b = pose().float()
    geometry = CameraGeometry(torch.full((56, 56), 2.0), K, rigid_inverse(b), convention="world_to_cam")
    untouched = build("vidllm_3d_patch", model=qwen)
    with untouched.inputs(images=[geometry]):
        assert torch.equal(embeddings(qwen, batch), before)  # zero-initialised last layer
    untouched.remove()
    torch.manual_seed(0)
    encoder = build("vidllm_3d_patch", {"hidden": 16, "zero_init": False, "coord_scale": 0.5}, model=qwen)
    with encoder.inputs(images=[geometry]):
        after = embeddings(qwen, batch)
    encoder.remove()
    image = batch["input_ids"][0] == IMAGE_ID
    centres = [(13.5, 13.5), (13.5, 41.5), (41.5, 13.5), (41.5, 41.5)]
    points = torch.stack([analytic_world(i, j, 2.0, K, b.double()) for i, j in centres]).float()
    with torch.no_grad():
        expected = encoder.mlp(points * 0.5)
    torch.testing.assert_close(after[image] - before[image], expected, atol=1e-5, rtol=0)


def test_encoders_stack_and_gradients_reach_learned_parameters(qwen):
    batch = tiny_inputs("qwen2_5_vl", "video")
    temporal = build("temporal_frame", {"mode": "learned"}, model=qwen)
    patch = build("vidllm_3d_patch", model=qwen)
    assert isinstance(temporal, TemporalFrameEncoder) and isinstance(patch, VidLLMPatchEncoder)
    geometry = CameraGeometry(torch.full((4, 56, 56), 2.0), K, torch.eye(4))
    with patch.inputs(videos=[geometry]):
        qwen(**batch).logits.sum().backward()
    assert temporal.table.weight.grad.abs().sum() > 0
    assert patch.mlp[-1].weight.grad.abs().sum() > 0
    for encoder in (temporal, patch):
        encoder.remove()
    qwen.zero_grad(set_to_none=True)


def test_encoders_hook_into_an_upcycled_moe_model():
    model = moekit.upcycle(tiny_model("qwen2_5_vl"), moekit.UpcycleSpec(layers="interval:2", num_experts=2, top_k=1))
    batch = tiny_inputs("qwen2_5_vl", "video")
    before = embeddings(model, batch)
    encoder = build("temporal_frame", {"max_wavelength": 50.0}, model=model)
    video = batch["input_ids"][0] == VIDEO_ID
    delta = embeddings(model, batch)[video] - before[video]
    encoder.remove()
    frames = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])[:, None].float()
    torch.testing.assert_close(delta, sinusoid(frames, 32, 2.0, 50.0), atol=1e-5, rtol=0)
