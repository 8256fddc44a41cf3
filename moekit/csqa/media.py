"""A pair's media in the output folder, in the layouts moekit's data layer reads.

    media/<pair>/image.<ext>          the image
    media/<pair>/clip/0000.<ext> ...  the clip's frames (a frame folder, `data.frames`)
    media/<pair>/scene/               a ScanNet-style scene folder (`data.scene`): color/, depth/ (uint16 PNG,
                                      millimetres), pose/, intrinsic.txt

Images and frames are symbolic links to the released files (`link`, the default) or copies (`copy`); depth maps
are always rewritten as PNG (3RScan stores PGM).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from moekit.csqa.graphs import PairedGraph

Mode = Literal["link", "copy"]


def folder_name(pair_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", pair_id)


def _put(src: str, dst: Path, mode: Mode) -> None:
    source = Path(src)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: medium not found")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        os.symlink(source.resolve(), dst)
    else:
        shutil.copyfile(source, dst)


def write_media(pair: PairedGraph, out: Path, mode: Mode) -> dict[str, str]:
    """Write `pair`'s media under `out/media/`; return the paths relative to `out` ("image", "video"|"scene")."""
    rel = Path("media") / folder_name(pair.id)
    m = pair.media
    image = rel / f"image{Path(m.image).suffix}"
    _put(m.image, out / image, mode)
    paths = {"image": str(image)}
    if m.frames is not None:
        for i, frame in enumerate(m.frames):
            _put(frame, out / rel / "clip" / f"{i:04d}{Path(frame).suffix}", mode)
        paths["video"] = str(rel / "clip")
    if m.views is not None:
        scene = out / rel / "scene"
        for sub in ("color", "depth", "pose"):
            (scene / sub).mkdir(parents=True, exist_ok=True)
        for i, view in enumerate(m.views):
            _put(view.color, scene / "color" / f"{i}{Path(view.color).suffix}", mode)
            if view.depth is None or not Path(view.depth).is_file():
                raise FileNotFoundError(f"{view.depth}: depth map of view {view.color} not found")
            with Image.open(view.depth) as depth:
                Image.fromarray(np.asarray(depth).astype(np.uint16)).save(scene / "depth" / f"{i}.png")
            np.savetxt(scene / "pose" / f"{i}.txt", np.asarray(view.pose), fmt="%.9g")
        k4 = np.eye(4)
        k4[:3, :3] = np.asarray(m.intrinsics)
        np.savetxt(scene / "intrinsic.txt", k4, fmt="%.9g")
        paths["scene"] = str(rel / "scene")
    return paths
