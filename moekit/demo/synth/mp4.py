"""Write frames as an .mp4 with PyAV (the optional `video` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moekit.data.frames import require_av


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = 4) -> None:
    """Encode uint8 [H, W, 3] frames (even sizes) with the MPEG-4 part 2 codec every FFmpeg build has."""
    av = require_av()
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
