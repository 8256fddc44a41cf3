import sys

import numpy as np
import pytest
from PIL import Image

from moekit.data.config import FramesSpec
from moekit.data.frames import MissingExtraError, keyframe_indices, read_video, uniform_indices


def test_uniform_indices():
    assert uniform_indices(10, 4) == [0, 3, 6, 9]
    assert uniform_indices(3, 8) == [0, 1, 2]
    assert uniform_indices(100, 1) == [0]
    idx = uniform_indices(1000, 32)
    assert len(idx) == 32 and idx[0] == 0 and idx[-1] == 999 and idx == sorted(set(idx))


def _clip_with_cuts(total: int, cuts: list[int]) -> list[np.ndarray]:
    """A clip whose content is constant except at `cuts`, where the colour jumps."""
    frames, level = [], 0
    for t in range(total):
        if t in cuts:
            level += 60
        frames.append(np.full((24, 32, 3), level, dtype=np.uint8))
    return frames


def test_keyframes_pick_the_changes():
    frames = _clip_with_cuts(30, [5, 12, 20])
    thumbs = np.stack([f[..., 0] for f in frames]).astype(np.float32)
    assert keyframe_indices(thumbs, 4) == [0, 5, 12, 20]


def test_keyframes_of_a_static_clip_are_uniform():
    thumbs = np.zeros((30, 8, 8), dtype=np.float32)
    assert keyframe_indices(thumbs, 4) == uniform_indices(30, 4)


def test_read_video_folder_keyframes_and_size(tmp_path):
    for t, frame in enumerate(_clip_with_cuts(30, [1, 2, 3])):
        Image.fromarray(np.repeat(np.repeat(frame, 30, 0), 30, 1)).save(tmp_path / f"frame_{t}.png")  # 720x960
    spec = FramesSpec(max_frames=4, sampling="keyframe")
    frames = read_video(tmp_path, spec)
    assert [int(np.asarray(f)[0, 0, 0]) for f in frames] == [0, 60, 120, 180]
    assert all(f.size == (640, 480) for f in frames)  # fitted within PolyV's 640x480
    uniform = read_video(tmp_path, FramesSpec(max_frames=4))
    assert [int(np.asarray(f)[0, 0, 0]) for f in uniform] == [0, 180, 180, 180]  # frames 0, 10, 19, 29


def test_frame_folders_sort_naturally(tmp_path):
    for t in (0, 1, 2, 10):
        Image.new("RGB", (8, 8), (t, 0, 0)).save(tmp_path / f"{t}.png")
    frames = read_video(tmp_path, FramesSpec(max_frames=8))
    assert [np.asarray(f)[0, 0, 0] for f in frames] == [0, 1, 2, 10]


def test_mp4_without_pyav_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "av", None)  # what an environment without PyAV looks like to `import av`
    with pytest.raises(MissingExtraError, match=r"moekit\[video\]"):
        read_video(tmp_path / "clip.mp4", FramesSpec())


def test_mp4_round_trip(tmp_path):
    pytest.importorskip("av")
    from moekit.demo.synth.mp4 import write_mp4

    frames = [np.full((48, 64, 3), (0, 0, 0) if t < 6 else (200, 200, 200), dtype=np.uint8) for t in range(12)]
    write_mp4(tmp_path / "clip.mp4", frames)
    got = read_video(tmp_path / "clip.mp4", FramesSpec(max_frames=2, sampling="keyframe"))
    assert len(got) == 2 and got[0].size == (64, 48)
    assert np.asarray(got[0]).mean() < 30 and np.asarray(got[1]).mean() > 170  # frame 0 and the cut at frame 6
    assert len(read_video(tmp_path / "clip.mp4", FramesSpec(max_frames=32))) == 12
