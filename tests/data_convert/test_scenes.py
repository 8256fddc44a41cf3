"""The 3D converters (scannet, llava-3d, 3rscan, scan2cap) on tiny fixtures written in the released layouts.

Fixture geometry: cameras look down at the floor z = 0 (a tilted view, so a wrong K or pose moves points off it);
depth is ray-cast through the depth camera and stored in integer millimetres, so every converted view must
back-project (PolyV eq. 12) onto the exact world points the fixture cast, within the millimetre rounding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moekit.data.config import DataConfig, FramesSpec
from moekit.data.convert import LayoutError, convert_dataset
from moekit.data.convert import scannet as scannet_mod
from moekit.data.loader import build_dataset
from moekit.data.scene import read_scene, scale_intrinsics

K_DEPTH = np.array([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])  # 64x48 depth camera
DEPTH_SIZE, COLOR_SIZE = (64, 48), (128, 96)
# ScanNet's colour K is close to, not equal to, the depth K scaled up: shift cy by 2 colour pixels
K_COLOR = scale_intrinsics(K_DEPTH, DEPTH_SIZE, COLOR_SIZE) + np.array([[0, 0, 0], [0, 0, 2.0], [0, 0, 0]])
ALIGN = np.array(
    [[np.cos(0.5), -np.sin(0.5), 0.0, 1.0], [np.sin(0.5), np.cos(0.5), 0.0, -2.0], [0.0, 0.0, 1.0, 0.1], [0, 0, 0, 1]]
)
FRAMES = range(0, 41)  # ScanNet frame numbers; 10 lost tracking (-inf pose)
LOST = (10,)


def camera(n: int) -> np.ndarray:
    """Camera-to-world (OpenCV axes) of frame n: 1.5 m up, looking down ~31 degrees, moving along x while turning
    3 degrees per frame about the vertical."""
    yaw, pitch = np.radians(3.0 * n), np.arctan(0.6)
    forward = np.array([-np.sin(yaw) * np.cos(pitch), np.cos(yaw) * np.cos(pitch), -np.sin(pitch)])
    right = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, np.cross(forward, right), forward], axis=1)
    pose[:3, 3] = [0.05 * n, -2.0, 1.5]
    return pose


def cast(k: np.ndarray, pose: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(depth in millimetres uint16 [h, w], world points [h, w, 3]) of the floor z = 0 seen through (k, pose)."""
    w, h = size
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    rays = np.stack([jj, ii, np.ones_like(jj)], -1).astype(np.float64) @ np.linalg.inv(k).T
    world_rays = rays @ pose[:3, :3].T
    z = -pose[2, 3] / world_rays[..., 2]
    mm = np.round(z * 1000).astype(np.uint16)
    return mm, pose[:3, 3] + (mm / 1000.0)[..., None] * world_rays


def backproject(depth: np.ndarray, k: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """PolyV eq. 12: [x y z 1] = [D[i,j] * ([j i 1] @ inv(K).T), 1] @ B.T, for every pixel."""
    h, w = depth.shape
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    cam = depth[..., None] * (np.stack([jj, ii, np.ones_like(jj)], -1).astype(np.float64) @ np.linalg.inv(k).T)
    return (np.concatenate([cam, np.ones_like(cam[..., :1])], -1) @ pose.T)[..., :3]


def save_mat(path: Path, matrix: np.ndarray) -> None:
    """SensReader's save_mat_to_file: one np.savetxt(fmt='%f') per row."""
    with open(path, "w") as fh:
        for row in matrix:
            np.savetxt(fh, row[np.newaxis], fmt="%f")


def color_image(n: int, size: tuple[int, int]) -> Image.Image:
    """A smooth picture (JPEG keeps it close), different per frame and with no symmetry."""
    jj, ii = np.meshgrid(np.arange(size[0]), np.arange(size[1]))
    rgb = np.stack([jj * 200 / size[0], ii * 200 / size[1], np.full_like(jj, 5 * n)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def k4(k: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = k
    return out


def write_scannet_scene(folder: Path, layout: str = "sensreader", frames=FRAMES) -> None:
    """One scene as SensReader's reader.py exports it, or as EmbodiedScan's posed_images."""
    for n in frames:
        pose = np.full((4, 4), -np.inf) if n in LOST else camera(n)
        depth, _ = cast(K_DEPTH, camera(n), DEPTH_SIZE)
        if layout == "sensreader":
            paths = (folder / "color" / f"{n}.jpg", folder / "depth" / f"{n}.png", folder / "pose" / f"{n}.txt")
        else:
            paths = tuple(folder / f"{n:05d}{ext}" for ext in (".jpg", ".png", ".txt"))
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        color_image(n, COLOR_SIZE).save(paths[0])
        Image.fromarray(depth).save(paths[1])  # 16-bit greyscale PNG, millimetres
        save_mat(paths[2], pose)
    if layout == "sensreader":
        (folder / "intrinsic").mkdir()
        save_mat(folder / "intrinsic" / "intrinsic_color.txt", k4(K_COLOR))
        save_mat(folder / "intrinsic" / "intrinsic_depth.txt", k4(K_DEPTH))
        save_mat(folder / "intrinsic" / "extrinsic_color.txt", np.eye(4))
        save_mat(folder / "intrinsic" / "extrinsic_depth.txt", np.eye(4))
    else:
        save_mat(folder / "intrinsic.txt", k4(K_COLOR))
        save_mat(folder / "depth_intrinsic.txt", k4(K_DEPTH))


def write_scans_meta(scans: Path, scene_id: str, scene_type: str = "Living room / Lounge") -> None:
    """ScanNet's scans/<scene_id>/<scene_id>.txt (the lines moekit reads, plus neighbours)."""
    (scans / scene_id).mkdir(parents=True)
    values = " ".join(f"{x:.6f}" for x in ALIGN.reshape(-1))
    (scans / scene_id / f"{scene_id}.txt").write_text(
        f"axisAlignment = {values}\ncolorHeight = 968\ncolorWidth = 1296\ndepthHeight = 480\ndepthWidth = 640\n"
        f"numColorFrames = {len(FRAMES)}\nsceneType = {scene_type}\n"
    )


@pytest.fixture
def scannet_src(tmp_path):
    src = tmp_path / "scannet_export"
    write_scannet_scene(src / "scene0000_00")
    write_scannet_scene(src / "scene0001_00", frames=range(0, 21))
    write_scans_meta(tmp_path / "scans", "scene0000_00")
    write_scans_meta(tmp_path / "scans", "scene0001_00", "Kitchen")
    return src


def aligned_scenes(tmp_path: Path, src: Path) -> Path:
    out = tmp_path / "scenes_out"
    convert_dataset("scannet", src, out, {"scans": str(tmp_path / "scans")}, progress=False)
    return out / "media" / "scenes"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- scannet


def test_scannet_scene_loads_with_exact_geometry(scannet_src, tmp_path):
    out = tmp_path / "out"
    summary = convert_dataset("scannet", scannet_src, out, {}, progress=False)
    assert summary.written == 0 and (out / "data.jsonl").read_text() == ""  # scenes alone: a media conversion
    scene = out / "media" / "scenes" / "scene0000_00"
    record = json.loads((scene / "scene.json").read_text())
    assert record["frames"] == [0, 20, 30, 40] and not record["axis_aligned"]  # every 10th, -inf pose dropped
    loaded = read_scene(scene, FramesSpec(max_width=64, max_height=48))
    assert loaded.frames[0].size == DEPTH_SIZE and loaded.depth.shape == (4, 48, 64)
    np.testing.assert_allclose(loaded.intrinsics, K_DEPTH, atol=1e-9)  # depth K, scaled twice
    for view, n in enumerate(record["frames"]):
        np.testing.assert_allclose(loaded.poses[view], camera(n), atol=1e-6)  # SensReader's %f
        world = backproject(loaded.depth[view].astype(np.float64), loaded.intrinsics, loaded.poses[view])
        assert np.abs(world - cast(K_DEPTH, camera(n), DEPTH_SIZE)[1]).max() < 1e-4
        assert np.abs(world[..., 2]).max() < 1e-3  # on the floor
    # colour and depth are hard links to the export, not copies
    assert (
        os.stat(scene / "color" / "20.jpg").st_ino == os.stat(scannet_src / "scene0000_00" / "color" / "20.jpg").st_ino
    )


def test_scannet_axis_alignment_colour_k_and_copies(scannet_src, tmp_path):
    out = tmp_path / "out"
    options = {"scans": str(tmp_path / "scans"), "intrinsics": "color", "files": "copy", "max_views": 2}
    convert_dataset("scannet", scannet_src, out, options, progress=False)
    scene = out / "media" / "scenes" / "scene0000_00"
    assert json.loads((scene / "scene.json").read_text())["frames"] == [0, 40]
    loaded = read_scene(scene, FramesSpec(max_width=128, max_height=96))
    np.testing.assert_allclose(loaded.intrinsics, K_COLOR, atol=1e-6)
    np.testing.assert_allclose(loaded.poses[1], np.round(ALIGN, 6) @ camera(40), atol=1e-5)
    assert (
        os.stat(scene / "color" / "40.jpg").st_ino != os.stat(scannet_src / "scene0000_00" / "color" / "40.jpg").st_ino
    )


def test_scannet_posed_images_layout_and_room_type_samples(tmp_path, preprocessor):
    src = tmp_path / "posed_images"
    write_scannet_scene(src / "scene0000_00", layout="posed", frames=range(0, 41, 10))
    write_scans_meta(tmp_path / "scans", "scene0000_00")
    out = tmp_path / "out"
    options = {"scans": str(tmp_path / "scans"), "describe": "scene-type"}
    assert convert_dataset("scannet", src, out, options, progress=False).written == 1
    (line,) = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert line["scene"] == "media/scenes/scene0000_00"
    assert line["conversations"][1]["value"] == "Living room / Lounge."
    scene = read_scene(out / line["scene"], FramesSpec(max_width=64, max_height=48))
    assert scene.indices == [0, 1, 2, 3]  # 00000, 00020, 00030, 00040
    world = backproject(scene.depth[2].astype(np.float64), scene.intrinsics, scene.poses[2])
    assert np.abs(world - (cast(K_DEPTH, camera(30), DEPTH_SIZE)[1] @ ALIGN[:3, :3].T + ALIGN[:3, 3])).max() < 1e-3
    dataset = build_dataset(DataConfig(datasets=[{"name": "scannet", "path": str(out / "data.jsonl")}]), preprocessor)
    item = dataset[0]
    assert item["sample_modalities"] == "3d" and item["geometry"]["poses"].shape[0] >= 4


def test_scannet_resume_after_a_kill_gives_the_same_output(scannet_src, tmp_path, monkeypatch):
    options = {"scans": str(tmp_path / "scans"), "describe": "scene-type"}
    clean = tmp_path / "clean"
    convert_dataset("scannet", scannet_src, clean, options, progress=False)

    killed = tmp_path / "killed"
    real = scannet_mod.write_scene
    calls = []

    def dies_on_second(folder, target, *args):
        calls.append(folder.name)
        if len(calls) == 2:
            (target / "color").mkdir()  # half a scene folder, as a kill would leave it
            raise KeyboardInterrupt
        return real(folder, target, *args)

    monkeypatch.setattr(scannet_mod, "write_scene", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset("scannet", scannet_src, killed, options, progress=False)
    assert not (killed / "data.jsonl").exists() and (killed / "media" / "scenes" / "scene0000_00").is_dir()
    assert not (killed / "media" / "scenes" / "scene0001_00").exists()
    monkeypatch.setattr(scannet_mod, "write_scene", real)
    summary = convert_dataset("scannet", scannet_src, killed, options, progress=False)
    assert summary.resumed_from == 1 and summary.written == 2
    assert (killed / "data.jsonl").read_text() == (clean / "data.jsonl").read_text()
    assert _tree(killed / "media") == _tree(clean / "media")


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda s: [p.unlink() for p in (s / "pose").iterdir()], "pose"),
        (lambda s: (s / "pose" / "20.txt").unlink(), "20.txt"),
        (lambda s: (s / "intrinsic" / "intrinsic_depth.txt").unlink(), "depth intrinsics"),
        (lambda s: (s / "depth" / "30.png").rename(s / "depth" / "30.tif"), "30.png"),
    ],
)
def test_scannet_bad_layout_is_refused_before_out(scannet_src, tmp_path, damage, named):
    damage(scannet_src / "scene0000_00")
    out = tmp_path / "out"
    with pytest.raises(LayoutError, match=named):
        convert_dataset("scannet", scannet_src, out, {}, progress=False)
    assert not out.exists()


def test_scannet_not_an_export_and_missing_metadata_are_refused(tmp_path, scannet_src):
    raw = tmp_path / "scans_raw" / "scene0000_00"
    raw.mkdir(parents=True)
    (raw / "scene0000_00.sens").write_bytes(b"\x04\x00\x00\x00")
    with pytest.raises(LayoutError, match="no scene folders"):
        convert_dataset("scannet", raw.parent, tmp_path / "out", {}, progress=False)
    (tmp_path / "scans" / "scene0001_00" / "scene0001_00.txt").unlink()
    with pytest.raises(LayoutError, match=r"scene0001_00\.txt"):
        convert_dataset("scannet", scannet_src, tmp_path / "out", {"scans": str(tmp_path / "scans")}, progress=False)
    with pytest.raises(ValueError, match="scans"):
        convert_dataset("scannet", scannet_src, tmp_path / "out", {"describe": "scene-type"}, progress=False)
    with pytest.raises(ValueError, match="evry"):
        convert_dataset("scannet", scannet_src, tmp_path / "out", {"evry": 5}, progress=False)
    assert not (tmp_path / "out").exists()


def test_scannet_cli_converts(scannet_src, tmp_path):
    from typer.testing import CliRunner

    from moekit.cli.app import app

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["data", "convert", "scannet", str(scannet_src), "-o", str(out), "--option", "every=20", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "media/scenes/scene0000_00/scene.json").read_text())["frames"] == [0, 20, 40]


# ---------------------------------------------------------------- llava-3d


def llava_3d_records() -> list[dict]:
    """LLaVA-3D-Instruct records as docs/fintune_custom_data.md and its loader read them."""
    return [
        {
            "id": 0,
            "video": "scannet/scene0000_00",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat is on the floor? Answer using one word."},
                {"from": "gpt", "value": "Nothing."},
            ],
        },
        {
            "id": 1,
            "video": ["scannet/posed_images/scene0000_00/00030.jpg", "scannet/posed_images/scene0000_00/00000.jpg"],
            "conversations": [
                {"from": "human", "value": "<video>\nDescribe the scene concisely."},
                {"from": "gpt", "value": "An empty floor."},
            ],
        },
        {
            "id": 2,
            "prompt_id": "scene0000_00_1_0",
            "video": "scannet/scene0000_00",
            "target": {"boxes": [[1.0, 2.0, 0.5, 0.3, 0.3, 0.3], [-0.25, 0.125, 0.0]]},
            "conversations": [
                {
                    "from": "human",
                    "value": "<video>\nThe related objects are located at <boxes>. Are they the same?",
                    "boxes_seq": [[0, 1]],
                },
                {"from": "gpt", "value": ["No.", "They differ."]},
            ],
        },
        {
            "id": 3,
            "video": "matterport3d/1mp3d_0047_region0",
            "conversations": [{"from": "human", "value": "<video>\nHi"}, {"from": "gpt", "value": "Hello."}],
        },
        {
            "id": 4,
            "video": "scannet/scene0999_00",
            "conversations": [{"from": "human", "value": "<video>\nHi"}, {"from": "gpt", "value": "Hello."}],
        },
    ]


def test_llava_3d_converts_over_converted_scenes(scannet_src, tmp_path, preprocessor):
    scenes = aligned_scenes(tmp_path, scannet_src)
    src = tmp_path / "llava3d_scannet_test.json"
    src.write_text(json.dumps(llava_3d_records()))
    out = tmp_path / "out"
    summary = convert_dataset("llava-3d", src, out, {"scenes": str(scenes)}, progress=False)
    assert summary.written == 3
    assert dict(summary.skipped) == {
        "not a ScanNet scene (dataset 'matterport3d')": 1,
        "scene folder not found under the scenes option": 1,
    }
    lines = {x["id"]: x for x in map(json.loads, (out / "data.jsonl").read_text().splitlines())}
    whole, views, boxes = (
        lines["llava3d_scannet_test-0"],
        lines["llava3d_scannet_test-1"],
        lines["llava3d_scannet_test-2"],
    )
    assert (out / whole["scene"]).resolve() == (scenes / "scene0000_00").resolve()  # points into it, no copy
    assert whole["conversations"][0]["value"] == "<video>\nWhat is on the floor? Answer using one word."
    assert boxes["conversations"][0]["value"] == (
        "<video>\nThe related objects are located at [1.000, 2.000, 0.500], [-0.250, 0.125, 0.000]. Are they the same?"
    )
    assert boxes["conversations"][1]["value"] == "No." and boxes["meta"]["answers"] == ["No.", "They differ."]
    assert boxes["meta"]["prompt_id"] == "scene0000_00_1_0"
    # a view list: a folder of exactly those views, linked from the scene folder, geometry intact
    sub = out / views["scene"]
    assert views["scene"].startswith("media/views/scene0000_00-") and views["meta"]["frames"] == [30, 0]
    assert sorted(p.name for p in (sub / "color").iterdir()) == ["0.jpg", "30.jpg"]
    assert os.stat(sub / "color" / "30.jpg").st_ino == os.stat(scenes / "scene0000_00" / "color" / "30.jpg").st_ino
    loaded = read_scene(sub, FramesSpec(max_width=64, max_height=48))
    world = backproject(loaded.depth[1].astype(np.float64), loaded.intrinsics, loaded.poses[1])
    assert np.abs(world - (cast(K_DEPTH, camera(30), DEPTH_SIZE)[1] @ ALIGN[:3, :3].T + ALIGN[:3, 3])).max() < 1e-3
    dataset = build_dataset(DataConfig(datasets=[{"name": "l3d", "path": str(out / "data.jsonl")}]), preprocessor)
    assert len(dataset) == 3 and all(dataset[i]["sample_modalities"] == "3d" for i in range(3))


def test_llava_3d_refuses_coordinates_over_unaligned_scenes(tmp_path):
    scenes = tmp_path / "posed_images"
    write_scannet_scene(scenes / "scene0000_00", layout="posed", frames=range(0, 41, 10))
    src = tmp_path / "instruct.json"
    src.write_text(json.dumps(llava_3d_records()))
    out = tmp_path / "out"
    with pytest.raises(LayoutError, match=r"instruct\.json #2.*axis-aligned"):
        convert_dataset("llava-3d", src, out, {"scenes": str(scenes)}, progress=False)
    assert not out.exists()
    summary = convert_dataset("llava-3d", src, out, {"scenes": str(scenes), "boxes": "skip"}, progress=False)
    assert summary.written == 2 and summary.skipped["uses <boxes>/<points> coordinates (boxes: skip)"] == 1
    first = json.loads((out / "data.jsonl").read_text().splitlines()[0])
    assert (out / first["scene"]).resolve() == (scenes / "scene0000_00").resolve()


def test_llava_3d_refuses_another_format(tmp_path, scannet_src):
    src = tmp_path / "llava_v1_5_mix665k.json"  # an image instruction file, not LLaVA-3D's
    src.write_text(json.dumps([{"id": "x", "image": "coco/1.jpg", "conversations": []}]))
    out = tmp_path / "out"
    with pytest.raises(LayoutError, match=r"llava_v1_5_mix665k\.json \(record #0 id 'x'\).*'video'"):
        convert_dataset("llava-3d", src, out, {"scenes": str(scannet_src)}, progress=False)
    with pytest.raises(LayoutError, match="option scenes"):
        convert_dataset("llava-3d", src, out, {"scenes": str(tmp_path)}, progress=False)
    assert not out.exists()


def test_llava_3d_resume_after_a_kill(scannet_src, tmp_path, monkeypatch):
    from moekit.data.convert import llava_3d

    scenes = aligned_scenes(tmp_path, scannet_src)
    src = tmp_path / "instruct.json"
    src.write_text(json.dumps(llava_3d_records()))
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    convert_dataset("llava-3d", src, clean, {"scenes": str(scenes)}, progress=False)
    real = llava_3d.convert

    def dies_on_third(rec, key, *args):
        if key.endswith("-2"):
            raise KeyboardInterrupt
        return real(rec, key, *args)

    monkeypatch.setattr(llava_3d, "convert", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset("llava-3d", src, killed, {"scenes": str(scenes)}, progress=False)
    monkeypatch.setattr(llava_3d, "convert", real)
    assert convert_dataset("llava-3d", src, killed, {"scenes": str(scenes)}, progress=False).resumed_from == 2
    assert (killed / "data.jsonl").read_text() == (clean / "data.jsonl").read_text()
    assert _tree(killed / "media") == _tree(clean / "media")


# ---------------------------------------------------------------- scan2cap


def scanrefer_records() -> list[dict]:
    """ScanRefer_filtered_*.json records (ScanRefer README, "Data format")."""
    return [
        {
            "scene_id": "scene0000_00",
            "object_id": "34",
            "object_name": "coffee_table",
            "ann_id": "0",
            "description": "this is a low wooden table . it is in front of the couch .",
            "token": ["this", "is", "a", "low", "wooden", "table", ".", "it", "is", "in", "front", "of", "the"],
        },
        {
            "scene_id": "scene0000_00",
            "object_id": "7",
            "object_name": "chair",
            "ann_id": "1",
            "description": "a black office chair .",
            "token": ["a", "black", "office", "chair", "."],
        },
        {
            "scene_id": "scene0001_00",
            "object_id": "2",
            "object_name": "door",
            "ann_id": "0",
            "description": "the white door .",
            "token": ["the", "white", "door", "."],
        },
    ]


def test_scan2cap_pairs_views_with_the_scene(scannet_src, tmp_path, preprocessor):
    scenes = aligned_scenes(tmp_path, scannet_src)
    src = tmp_path / "ScanRefer_filtered_train.json"
    src.write_text(json.dumps(scanrefer_records()))
    cameras = tmp_path / "annotated_cameras"
    cameras.mkdir()
    # the annotator looked at a floor point on frame 20's optical axis (original, unaligned ScanNet frame)
    pose = camera(20)
    lookat = pose[:3, 3] + pose[:3, 2] * (1.5 / -pose[2, 2])
    entry = {"scene_id": "scene0000_00", "object_id": "34", "object_name": "coffee_table", "ann_id": "0"}
    camera_record = {"position": pose[:3, 3].tolist(), "rotation": [0, 0, 0], "lookat": lookat.tolist()}
    (cameras / "scene0000_00.anns.json").write_text(json.dumps([{**entry, "id": "x", "camera": camera_record}]))
    out = tmp_path / "out"
    summary = convert_dataset("scan2cap", src, out, {"scenes": str(scenes), "cameras": str(cameras)}, progress=False)
    assert summary.written == 3
    lines = {x["id"]: x for x in map(json.loads, (out / "data.jsonl").read_text().splitlines())}
    table = lines["scene0000_00-34_0"]
    assert table["meta"]["view"] == 20 and table["meta"]["view_source"] == "annotated camera: sees the lookat point"
    assert table["image"] == "../scenes_out/media/scenes/scene0000_00/color/20.jpg"
    assert (out / table["paired"]["scene"]).resolve() == (scenes / "scene0000_00").resolve()
    assert table["conversations"] == [
        {"from": "human", "value": "<image>\nDescribe the coffee table in this room."},
        {"from": "gpt", "value": "this is a low wooden table . it is in front of the couch ."},
    ]
    assert lines["scene0000_00-7_1"]["meta"] == {
        "object_id": "7",
        "object_name": "chair",
        "view": 30,
        "view_source": "middle view",
    }  # no annotated camera: views 0, 20, 30, 40 -> the middle one
    dataset = build_dataset(DataConfig(datasets=[{"name": "s2c", "path": str(out / "data.jsonl")}]), preprocessor)
    item = dataset[0]
    assert item["sample_modalities"] == "image" and item["teacher"]["scene"]["poses"].shape[0] == 4


def test_scan2cap_refuses_another_annotation_file(scannet_src, tmp_path):
    src = tmp_path / "ScanQA_v1.0_train.json"  # ScanQA: same scenes, other fields
    src.write_text(json.dumps([{"scene_id": "scene0000_00", "object_ids": [3], "question": "?", "answers": ["a"]}]))
    out = tmp_path / "out"
    with pytest.raises(LayoutError, match=r"ScanQA_v1\.0_train\.json \(record #0\): expected field 'object_id'"):
        convert_dataset("scan2cap", src, out, {"scenes": str(scannet_src)}, progress=False)
    src.write_text(json.dumps(scanrefer_records()))
    cameras = tmp_path / "annotated_cameras"
    cameras.mkdir()
    (cameras / "scene0001_00.anns.json").write_text(json.dumps([{"object_id": "2", "ann_id": "0", "camera": {}}]))
    with pytest.raises(LayoutError, match=r"scene0001_00\.anns\.json \(record #0\).*lookat"):
        convert_dataset("scan2cap", src, out, {"scenes": str(scannet_src), "cameras": str(cameras)}, progress=False)
    assert not out.exists()


# ---------------------------------------------------------------- 3rscan

RIO_K_DEPTH = np.array([[40.0, 0.0, 23.5], [0.0, 42.0, 15.5], [0.0, 0.0, 1.0]])  # 48x32 depth camera
RIO_DEPTH, RIO_COLOR = (48, 32), (96, 64)
RIO_K_COLOR = scale_intrinsics(RIO_K_DEPTH, RIO_DEPTH, RIO_COLOR)
SCAN = "754e884c-ea24-2175-8b34-cead19d4198d"


def _line(k: np.ndarray) -> str:
    return " ".join(f"{x:g}" for x in k4(k).reshape(-1))


def write_3rscan(root: Path, scan: str = SCAN, frames: int = 5) -> Path:
    """One scan as released (sequence.zip extracted): _info.txt, frame-XXXXXX.{color.jpg, depth.pgm, pose.txt}."""
    seq = root / scan / "sequence"
    seq.mkdir(parents=True)
    (seq / "_info.txt").write_text(
        "m_versionNumber = 4\nm_sensorName = Tango\n"
        f"m_colorWidth = {RIO_COLOR[0]}\nm_colorHeight = {RIO_COLOR[1]}\n"
        f"m_depthWidth = {RIO_DEPTH[0]}\nm_depthHeight = {RIO_DEPTH[1]}\nm_depthShift = 1000\n"
        f"m_calibrationColorIntrinsic = {_line(RIO_K_COLOR)}\nm_calibrationColorExtrinsic = {_line(np.eye(3))}\n"
        f"m_calibrationDepthIntrinsic = {_line(RIO_K_DEPTH)}\nm_calibrationDepthExtrinsic = {_line(np.eye(3))}\n"
        f"m_frames.size = {frames}\n"
    )
    for n in range(frames):
        stem = seq / f"frame-{n:06d}"
        color_image(n, RIO_COLOR).save(f"{stem}.color.jpg")
        depth, _ = cast(RIO_K_DEPTH, camera(n), RIO_DEPTH)
        header = f"P5\n{RIO_DEPTH[0]} {RIO_DEPTH[1]}\n65535\n".encode()
        Path(f"{stem}.depth.pgm").write_bytes(header + depth.astype(">u2").tobytes())  # binary PGM: big-endian
        pose = np.full((4, 4), np.nan) if n == 1 else camera(n)
        Path(f"{stem}.pose.txt").write_text("\n".join(" ".join(f"{x:.9f}" for x in row) for row in pose) + "\n")
    (root / scan / "semseg.v2.json").write_text(
        json.dumps(
            {
                "scan_id": scan,
                "segGroups": [
                    {"id": 1, "objectId": 1, "label": "floor", "segments": [1, 2]},
                    {"id": 2, "objectId": 2, "label": "chair", "segments": [3]},
                    {"id": 3, "objectId": 3, "label": "chair", "segments": [4]},
                    {"id": 4, "objectId": 4, "label": "table", "segments": [5]},
                ],
            }
        )
    )
    return root


def test_3rscan_upright_views_keep_the_geometry(tmp_path, preprocessor):
    src = write_3rscan(tmp_path / "3RScan")
    out = tmp_path / "out"
    assert convert_dataset("3rscan", src, out, {"images_per_scan": 2}, progress=False).written == 2
    scene = out / "media" / "scenes" / SCAN
    frames = json.loads((scene / "scene.json").read_text())["frames"]
    assert frames == [0, 2, 3, 4]  # frame 1's pose is not finite
    loaded = read_scene(scene, FramesSpec(max_width=32, max_height=48))
    assert loaded.frames[0].size == (32, 48) and loaded.depth.shape == (4, 48, 32)  # upright: portrait
    for view, n in enumerate(frames):
        world = backproject(loaded.depth[view].astype(np.float64), loaded.intrinsics, loaded.poses[view])
        truth = np.rot90(cast(RIO_K_DEPTH, camera(n), RIO_DEPTH)[1], 3, axes=(0, 1))
        assert np.abs(world - truth).max() < 1e-4
    raw = np.asarray(Image.open(src / SCAN / "sequence" / "frame-000002.color.jpg")).astype(int)
    with Image.open(scene / "color" / "000002.jpg") as image:  # turned like the depth: np.rot90(..., 3)
        assert image.size == (64, 96) and np.abs(np.asarray(image).astype(int) - np.rot90(raw, 3)).mean() < 3
    lines = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"{SCAN}-000002", f"{SCAN}-000004"]
    assert lines[0]["image"] == f"media/scenes/{SCAN}/color/000002.jpg"
    assert lines[0]["paired"] == {"scene": f"media/scenes/{SCAN}"}
    assert lines[0]["conversations"][1]["value"] == "The room contains: floor, chair (2), table."
    dataset = build_dataset(DataConfig(datasets=[{"name": "3r", "path": str(out / "data.jsonl")}]), preprocessor)
    item = dataset[1]
    assert item["sample_modalities"] == "image" and item["teacher"]["scene"]["depth"].shape[0] == 4


def test_3rscan_3dssg_labels_relations_and_links(tmp_path):
    src = write_3rscan(tmp_path / "3RScan", frames=3)
    objects = tmp_path / "objects.json"
    objects.write_text(
        json.dumps(
            {
                "scans": [
                    {
                        "scan": SCAN,
                        "objects": [
                            {"global_id": "6", "label": "floor", "ply_color": "#aec7e8", "id": "1"},
                            {"global_id": "2", "label": "office chair", "id": "2", "attributes": {"color": ["black"]}},
                            {"global_id": "9", "label": "desk", "id": "4"},
                        ],
                    }
                ]
            }
        )
    )
    rels = tmp_path / "relationships.json"
    rels.write_text(
        json.dumps(
            {
                "scans": [
                    {
                        "scan": SCAN,
                        "split": 0,
                        "objects": {"1": "floor", "2": "office chair"},
                        "relationships": [[2, 1, 1, "standing on"], [4, 1, 1, "standing on"]],
                    },  # fmt: skip
                    {"scan": SCAN, "split": 1, "relationships": [[2, 4, 8, "close by"], [2, 1, 1, "standing on"]]},
                ]
            }
        )
    )
    out = tmp_path / "out"
    options = {"objects": str(objects), "relationships": str(rels), "rotate": "none", "max_relations": 2}
    convert_dataset("3rscan", src, out, options, progress=False)
    (line,) = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert line["conversations"][1]["value"] == (
        "The room contains: floor, office chair, desk. Relations: office chair standing on floor; desk standing on floor."
    )
    scene = out / "media" / "scenes" / SCAN
    assert (
        os.stat(scene / "color" / "000002.jpg").st_ino == os.stat(src / SCAN / "sequence/frame-000002.color.jpg").st_ino
    )
    loaded = read_scene(scene, FramesSpec(max_width=48, max_height=32))
    world = backproject(loaded.depth[1].astype(np.float64), loaded.intrinsics, loaded.poses[1])
    assert np.abs(world - cast(RIO_K_DEPTH, camera(2), RIO_DEPTH)[1]).max() < 1e-4


def test_3rscan_bad_layouts_are_refused_before_out(tmp_path):
    zipped = tmp_path / "zipped"
    (zipped / SCAN).mkdir(parents=True)
    (zipped / SCAN / "sequence.zip").write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    out = tmp_path / "out"
    with pytest.raises(LayoutError, match="sequence.zip.*not extracted"):
        convert_dataset("3rscan", zipped, out, {}, progress=False)
    src = write_3rscan(tmp_path / "3RScan", frames=2)
    info = src / SCAN / "sequence" / "_info.txt"
    info.write_text(info.read_text().replace("m_calibrationDepthIntrinsic", "m_calibrationDepthIntrinsics"))
    with pytest.raises(LayoutError, match=r"_info\.txt.*m_calibrationColorIntrinsic"):
        convert_dataset("3rscan", src, out, {}, progress=False)
    src = write_3rscan(tmp_path / "again", frames=2)
    (src / SCAN / "sequence" / "frame-000001.pose.txt").unlink()
    with pytest.raises(LayoutError, match=r"frame-000001\.pose\.txt"):
        convert_dataset("3rscan", src, out, {}, progress=False)
    src = write_3rscan(tmp_path / "eight_bit", frames=2)
    depth = src / SCAN / "sequence" / "frame-000000.depth.pgm"
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(depth, format="PPM")  # an 8-bit PGM
    with pytest.raises(LayoutError, match="16-bit PGM"):
        convert_dataset("3rscan", src, out, {}, progress=False)
    assert not out.exists()


def test_3rscan_resume_after_a_kill(tmp_path, monkeypatch):
    from moekit.data.convert import rscan

    src = write_3rscan(tmp_path / "3RScan", frames=3)
    write_3rscan(src, scan="0cac7578-8d6f-2d13-8c2d-bfa7a04f8af3", frames=3)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    convert_dataset("3rscan", src, clean, {}, progress=False)
    real = rscan.write_scan

    def dies_on_second(scan, *args):
        if scan.name == SCAN:
            raise KeyboardInterrupt
        return real(scan, *args)

    monkeypatch.setattr(rscan, "write_scan", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset("3rscan", src, killed, {}, progress=False)
    monkeypatch.setattr(rscan, "write_scan", real)
    assert convert_dataset("3rscan", src, killed, {}, progress=False).resumed_from == 1
    assert (killed / "data.jsonl").read_text() == (clean / "data.jsonl").read_text()
    assert _tree(killed / "media") == _tree(clean / "media")
