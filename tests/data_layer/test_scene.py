import numpy as np
import pytest
from PIL import Image

from moekit.data.config import FramesSpec
from moekit.data.scene import read_scene, scale_intrinsics, write_scene
from moekit.demo.synth import render3d


def _backproject(depth: np.ndarray, k: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """PolyV eq. 12: [x y z 1] = [D[i,j] * ([j i 1] @ inv(K).T), 1] @ B.T, for every pixel."""
    height, width = depth.shape
    jj, ii = np.meshgrid(np.arange(width), np.arange(height))
    pix = np.stack([jj, ii, np.ones_like(jj)], -1).astype(np.float64)
    cam = depth[..., None] * (pix @ np.linalg.inv(k).T)
    return (np.concatenate([cam, np.ones_like(cam[..., :1])], -1) @ pose.T)[..., :3]


@pytest.fixture
def scene(tmp_path):
    objects = [
        render3d.Object3D("ball", "red", (0.5, -0.3), 0.4),
        render3d.Object3D("box", "blue", (-0.8, 0.6), 0.3),
    ]
    k = render3d.intrinsics(96, 72, focal=80.0)
    poses = render3d.orbit(4, radius=3.5, height=1.8)
    renders = [render3d.render(objects, p, k, (96, 72)) for p in poses]
    depth = np.stack([r[1] for r in renders])
    write_scene(tmp_path / "scene", [r[0] for r in renders], depth, k, np.stack(poses))
    return tmp_path / "scene", objects, k, np.stack(poses), depth, np.stack([r[2] for r in renders])


def test_scene_round_trip_is_exact(scene):
    folder, _, k, poses, depth, _ = scene
    loaded = read_scene(folder, FramesSpec(max_frames=8))
    assert loaded.indices == [0, 1, 2, 3]
    np.testing.assert_array_equal(loaded.poses, poses)  # 17 significant digits: bit-exact
    np.testing.assert_array_equal(loaded.intrinsics, k)
    assert np.abs(loaded.depth - depth).max() <= 0.0005 + 1e-6  # uint16 millimetres
    assert loaded.depth.dtype == np.float32 and loaded.frames[0].size == (96, 72)


def test_backprojected_depth_lands_on_the_surfaces(scene):
    folder, objects, _, _, _, ids = scene
    loaded = read_scene(folder, FramesSpec(max_frames=8))
    for view in range(4):
        world = _backproject(loaded.depth[view].astype(np.float64), loaded.intrinsics, loaded.poses[view])
        floor = ids[view] == -1
        assert floor.sum() > 100 and np.abs(world[floor][:, 2]).max() < 2e-3
        ball = ids[view] == 0
        assert ball.sum() > 20
        radius = np.linalg.norm(world[ball] - objects[0].middle, axis=-1)
        assert np.abs(radius - objects[0].size).max() < 2e-3
        box = world[ids[view] == 1]
        lo = np.array([-0.8 - 0.3, 0.6 - 0.3, 0.0]) - 2e-3
        hi = np.array([-0.8 + 0.3, 0.6 + 0.3, 0.6]) + 2e-3
        assert ((box >= lo) & (box <= hi)).all()
        assert (loaded.depth[view][ids[view] == -2] == 0).all()  # sky: no depth


def test_downscaled_scene_keeps_geometry(scene):
    """Frames fitted into a smaller size: depth resampled and K rescaled so back-projection still holds."""
    folder, objects, _, _, _, _ = scene
    loaded = read_scene(folder, FramesSpec(max_frames=2, max_width=48, max_height=48))
    assert loaded.indices == [0, 3] and loaded.frames[0].size == (48, 36) and loaded.depth.shape == (2, 36, 48)
    world = _backproject(loaded.depth[0].astype(np.float64), loaded.intrinsics, loaded.poses[0])
    red = np.asarray(loaded.frames[0])[..., 0] > 150
    ball = red & (np.asarray(loaded.frames[0])[..., 2] < 100) & (loaded.depth[0] > 0)
    radius = np.linalg.norm(world[ball] - objects[0].middle, axis=-1)
    assert ball.sum() > 5 and np.median(np.abs(radius - objects[0].size)) < 0.05


def test_scale_intrinsics_maps_pixel_centres():
    k = np.array([[100.0, 0, 63.5], [0, 100.0, 47.5], [0, 0, 1]])
    half = scale_intrinsics(k, (128, 96), (64, 48))
    assert half[0, 2] == pytest.approx(31.5) and half[0, 0] == pytest.approx(50.0)


def test_scannet_layout_variants(tmp_path, scene):
    folder, *_ = scene
    (folder / "intrinsic").mkdir()
    (folder / "intrinsic.txt").rename(folder / "intrinsic" / "intrinsic_color.txt")
    (folder / "pose" / "2.txt").write_text("-inf -inf -inf -inf\n" * 4)  # lost tracking: view dropped
    loaded = read_scene(folder, FramesSpec())
    assert loaded.indices == [0, 1, 3]
    (folder / "pose" / "1.txt").unlink()
    with pytest.raises(FileNotFoundError, match="1.txt"):
        read_scene(folder, FramesSpec())


def test_depth_must_be_16_bit(tmp_path, scene):
    folder, *_ = scene
    Image.new("RGB", (96, 72)).save(folder / "depth" / "0.png")
    with pytest.raises(ValueError, match="16-bit"):
        read_scene(folder, FramesSpec())
