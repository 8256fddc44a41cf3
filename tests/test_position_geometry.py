"""Camera geometry: PolyV eq. 12 and Vid-LLM eq. 3 against an analytic scene, token pooling, and bad input."""

import math

import pytest
import torch

from moekit.arch import TokenLayout
from moekit_plugins.position.geometry import (
    CameraGeometry,
    GeometryError,
    back_project,
    rigid_inverse,
    world_coords,
)

K = torch.tensor([[50.0, 0.0, 27.5], [0.0, 40.0, 27.5], [0.0, 0.0, 1.0]])


def rotation(axis, angle) -> torch.Tensor:
    """Rodrigues' formula."""
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    skew = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * skew + (1 - math.cos(angle)) * skew @ skew


def pose(axis=(1.0, 2.0, 3.0), angle=0.7, t=(1.0, -2.0, 0.5)) -> torch.Tensor:
    b = torch.eye(4, dtype=torch.float64)
    b[:3, :3] = rotation(axis, angle)
    b[:3, 3] = torch.tensor(t, dtype=torch.float64)
    return b


def analytic_world(i, j, depth, k, b) -> torch.Tensor:
    """The camera-frame point of pixel (row i, column j) at depth d, moved into the world by B."""
    camera = torch.tensor(
        [depth * (j - k[0, 2]) / k[0, 0], depth * (i - k[1, 2]) / k[1, 1], depth], dtype=torch.float64
    )
    return b[:3, :3] @ camera + b[:3, 3]


def test_world_coords_of_a_plane_at_known_depth_and_pose():
    b = pose()
    depth = torch.full((1, 56, 56), 2.0, dtype=torch.float64)
    world = world_coords(depth, K[None].double(), b[None])
    for i, j in [(0, 0), (10, 41), (55, 3), (27, 27)]:
        torch.testing.assert_close(world[0, i, j], analytic_world(i, j, 2.0, K, b))
    # every point lies on the plane n . x = n . t + d, n the camera's optical axis in the world
    normal = b[:3, 2]
    torch.testing.assert_close(
        world[0] @ normal, torch.full((56, 56), float(normal @ b[:3, 3] + 2.0), dtype=torch.float64)
    )


def test_vidllm_back_projection_matches_polyv_on_the_same_camera():
    b = torch.stack([pose(), pose((0.0, 1.0, 0.0), -1.2, (0.3, 0.0, 4.0))])
    depth = torch.rand(2, 28, 42, dtype=torch.float64) * 5 + 0.5
    intrinsics = torch.stack([K, K * torch.tensor([[1.1], [0.9], [1.0]])]).double()
    world_to_cam = rigid_inverse(b)
    points = back_project(depth, intrinsics, world_to_cam[:, :3, :3], world_to_cam[:, :3, 3])
    torch.testing.assert_close(points, world_coords(depth, intrinsics, b))
    torch.testing.assert_close(points[1, 5, 9], analytic_world(5, 9, float(depth[1, 5, 9]), intrinsics[1], b[1]))


def test_geometry_conventions_agree():
    b = pose()
    depth = torch.full((56, 56), 3.0, dtype=torch.float64)
    a = CameraGeometry(depth, K.double(), b)
    c = CameraGeometry(depth, K.double(), rigid_inverse(b), convention="world_to_cam")
    torch.testing.assert_close(a.cam_to_world(), c.cam_to_world())
    r, t = a.world_to_cam()
    torch.testing.assert_close(r[0], b[:3, :3].T)
    torch.testing.assert_close(t[0], -b[:3, :3].T @ b[:3, 3])


def test_merged_patch_pooling_takes_the_mean_over_the_tokens_pixels_and_frames():
    layout = TokenLayout(frames=4, height=56, width=84, grid=(2, 2, 3), frames_per_token=2, block=28)
    b = torch.stack([pose(t=(float(f), 0.0, 0.0)) for f in range(4)])  # the camera slides along x
    depth = torch.full((4, 56, 84), 2.0, dtype=torch.float64)
    depth[1, 28:, 56:] = 0  # no measurement in frame 1 for the last token of the first temporal patch
    geometry = CameraGeometry(depth, K.double(), b)
    world = world_coords(geometry.depth, geometry.intrinsics, geometry.cam_to_world())
    tokens, valid = layout.pool(world, geometry.valid())
    assert tokens.shape == (12, 3) and valid.all()
    # token (t=1, row 0, column 2): rows 0..27, columns 56..83, frames 2 and 3
    expected = (analytic_world(13.5, 69.5, 2.0, K, b[2]) + analytic_world(13.5, 69.5, 2.0, K, b[3])) / 2
    torch.testing.assert_close(tokens[1 * 6 + 0 * 3 + 2], expected)
    # token (t=0, row 1, column 2): frame 1's pixels are missing, so only frame 0 counts
    torch.testing.assert_close(tokens[5], analytic_world(41.5, 69.5, 2.0, K, b[0]))
    depth[:2, 28:, 56:] = float("nan")
    tokens, valid = layout.pool(world, CameraGeometry(depth, K.double(), b).valid())
    assert not valid[5] and valid.sum() == 11 and torch.equal(tokens[5], torch.zeros(3, dtype=torch.float64))


def test_frame_index_per_token():
    layout = TokenLayout(frames=2, height=28, width=28, grid=(2, 1, 1), frames_per_token=1, block=0, extra=1)
    assert layout.frame_index().tolist() == [0, 1, -1]


def _geometry(**overrides):
    args = {"depth": torch.ones(2, 28, 28), "intrinsics": K, "extrinsics": torch.eye(4)} | overrides
    return CameraGeometry(**args)


def _with(matrix_fn):
    b = torch.eye(4).repeat(2, 1, 1)
    matrix_fn(b[1])
    return b


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"intrinsics": torch.tensor([[0.0, 0, 1], [0, 40, 2], [0, 0, 1]])},
            r"intrinsics of frame 0 are not invertible",
        ),
        ({"intrinsics": torch.ones(3, 3)}, "not invertible"),
        ({"intrinsics": torch.full((3, 3), float("nan"))}, "not finite"),
        ({"intrinsics": torch.eye(4)}, r"intrinsics must be \[3, 3\] or \[frames=2, 3, 3\]"),
        ({"extrinsics": _with(lambda b: b[:3, :3].mul_(1.1))}, r"pose of frame 1 \(cam_to_world\) is not rigid"),
        ({"extrinsics": _with(lambda b: b[2, 2].fill_(-1))}, r"det R = -1, expected \+1 \(a reflection"),
        (
            {"extrinsics": _with(lambda b: b[3, 2].fill_(1))},
            r"last row \[0.0, 0.0, 1.0, 1.0\], expected \[0, 0, 0, 1\]",
        ),
        ({"extrinsics": _with(lambda b: b[0, 3].fill_(float("-inf")))}, "pose of frame 1 .* is not finite"),
        ({"extrinsics": torch.eye(4).repeat(3, 1, 1)}, r"extrinsics must be \[4, 4\] or \[frames=2, 4, 4\]"),
        ({"depth": torch.ones(2, 2, 2, 2)}, r"depth must be \[frames, H, W\]"),
        ({"convention": "camera"}, "convention must be 'cam_to_world' or 'world_to_cam'"),
    ],
)
def test_bad_geometry_is_refused(overrides, message):
    with pytest.raises(GeometryError, match=message):
        _geometry(**overrides)


def test_a_slightly_noisy_rotation_passes_and_the_tolerance_is_adjustable():
    b = _with(lambda b: b[:3, :3].add_(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)) * 1e-5))
    _geometry(extrinsics=b)
    with pytest.raises(GeometryError, match="not rigid"):
        _geometry(extrinsics=b, tolerance=1e-7)


def test_pixel_data_of_the_wrong_size_is_refused():
    layout = TokenLayout(frames=4, height=56, width=56, grid=(2, 2, 2), frames_per_token=2, block=28)
    message = r"has 3 frame\(s\) of 56x56 px, but the vision encoder saw 4 frame\(s\) of 56x56 px"
    with pytest.raises(ValueError, match=message):
        layout.pool(torch.zeros(3, 56, 56, 3), torch.ones(3, 56, 56, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"4 frame\(s\) of 50x56 px"):
        layout.check(4, 50, 56, "the depth")
