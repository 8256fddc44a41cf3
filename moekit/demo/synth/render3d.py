"""Analytic 3D scenes (a floor, boxes and balls) ray-cast through a pinhole camera: colour, exact depth, object ids.

World: z up, floor z = 0. Cameras follow OpenCV (x right, y down, z forward) and poses are camera-to-world.
The ray of pixel (i, j) is `R @ inv(K) @ [j, i, 1] `, whose camera-z component is 1, so the hit parameter is the
depth D[i, j] itself and PolyV's back-projection of (i, j, D) lands exactly on the surface that was hit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekit.demo.synth.vocab import COLOURS

FLOOR, SKY = (170, 160, 145), (70, 90, 120)
FLOOR_HALF = 4.0  # the floor is the square |x|, |y| <= FLOOR_HALF
LIGHT = np.array([0.4, 0.3, 0.85]) / np.linalg.norm([0.4, 0.3, 0.85])


@dataclass
class Object3D:
    shape: str  # "box" (axis-aligned, resting on the floor) or "ball" (resting on the floor)
    colour: str
    centre: tuple[float, float]  # x, y on the floor
    size: float  # box half-extent / ball radius

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def middle(self) -> np.ndarray:
        return np.array([self.centre[0], self.centre[1], self.size])


def intrinsics(width: int, height: int, focal: float) -> np.ndarray:
    return np.array([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world 4x4 for a camera at `eye` looking at `target` (world z up, image y down)."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye
    return pose


def orbit(views: int, radius: float, height: float, start: float = 0.0) -> list[np.ndarray]:
    """`views` poses evenly around the origin, looking at a point slightly above the floor."""
    out = []
    for v in range(views):
        angle = start + 2 * np.pi * v / views
        eye = np.array([radius * np.cos(angle), radius * np.sin(angle), height])
        out.append(look_at(eye, np.array([0.0, 0.0, 0.3])))
    return out


def _ball(origin: np.ndarray, dirs: np.ndarray, obj: Object3D) -> np.ndarray:
    oc = origin - obj.middle
    a = (dirs * dirs).sum(-1)
    b = 2 * (dirs @ oc)
    c = oc @ oc - obj.size**2
    disc = b * b - 4 * a * c
    root = np.sqrt(np.maximum(disc, 0))
    t = (-b - root) / (2 * a)
    return np.where((disc >= 0) & (t > 1e-6), t, np.inf)


def _box(origin: np.ndarray, dirs: np.ndarray, obj: Object3D) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([obj.centre[0] - obj.size, obj.centre[1] - obj.size, 0.0])
    hi = np.array([obj.centre[0] + obj.size, obj.centre[1] + obj.size, 2 * obj.size])
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - origin) / dirs, (hi - origin) / dirs
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = np.nanmax(near, axis=-1), np.nanmin(far, axis=-1)
    axis = np.nanargmax(near, axis=-1)
    hit = (t_near <= t_far) & (t_near > 1e-6)
    return np.where(hit, t_near, np.inf), axis


def render(objects: list[Object3D], pose: np.ndarray, k: np.ndarray, size: tuple[int, int]):
    """(rgb uint8 [H, W, 3], depth float64 [H, W] metres with 0 where nothing is hit, ids int [H, W] with
    -2 for sky, -1 for floor, else the object index)."""
    width, height = size
    jj, ii = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    pixels = np.stack([jj, ii, np.ones_like(jj)], axis=-1)
    dirs = pixels @ np.linalg.inv(k).T @ pose[:3, :3].T  # camera-z of every ray is 1
    origin = pose[:3, 3]
    depth = np.full((height, width), np.inf)
    ids = np.full((height, width), -2)
    normals = np.zeros((height, width, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = np.where(dirs[..., 2] < 0, -origin[2] / dirs[..., 2], np.inf)
    p = origin + dirs * t_floor[..., None]
    on_floor = np.isfinite(t_floor) & (np.abs(p[..., 0]) <= FLOOR_HALF) & (np.abs(p[..., 1]) <= FLOOR_HALF)
    depth = np.where(on_floor, t_floor, depth)
    ids[on_floor] = -1
    normals[on_floor] = (0.0, 0.0, 1.0)
    for index, obj in enumerate(objects):
        if obj.shape == "ball":
            t = _ball(origin, dirs, obj)
        else:
            t, axis = _box(origin, dirs, obj)
        closer = t < depth
        depth = np.where(closer, t, depth)
        ids[closer] = index
        hit = origin + dirs[closer] * t[closer][:, None]
        if obj.shape == "ball":
            normals[closer] = (hit - obj.middle) / obj.size
        else:
            n = np.zeros_like(hit)
            n[np.arange(len(hit)), axis[closer]] = np.sign(hit - obj.middle)[np.arange(len(hit)), axis[closer]]
            normals[closer] = n
    shade = 0.55 + 0.45 * np.clip(normals @ LIGHT, 0, 1)
    rgb = np.empty((height, width, 3))
    rgb[:] = SKY
    rgb[ids == -1] = FLOOR
    for index, obj in enumerate(objects):
        rgb[ids == index] = COLOURS[obj.colour]
    rgb = np.where((ids >= -1)[..., None], rgb * shade[..., None], rgb)
    depth = np.where(np.isfinite(depth), depth, 0.0)
    return np.clip(rgb, 0, 255).astype(np.uint8), depth, ids


def random_objects(rng: np.random.Generator, count: int) -> list[Object3D]:
    """Boxes and balls with distinct colours, spread on the floor without overlapping."""
    colours = list(COLOURS)
    order = rng.permutation(len(colours))
    out: list[Object3D] = []
    for n in range(count):
        for _attempt in range(200):
            size = float(rng.uniform(0.25, 0.45))
            centre = (float(rng.uniform(-1.6, 1.6)), float(rng.uniform(-1.6, 1.6)))
            if all(np.hypot(centre[0] - o.centre[0], centre[1] - o.centre[1]) > 1.5 * (size + o.size) for o in out):
                out.append(Object3D(str(rng.choice(["box", "ball"])), colours[order[n]], centre, size))
                break
        else:
            raise ValueError(f"cannot place {count} objects on the floor")
    return out


def camera_point(pose: np.ndarray, point: np.ndarray) -> np.ndarray:
    """A world point in camera coordinates (x right, y down, z = depth)."""
    return np.linalg.inv(pose) @ np.append(point, 1.0)
