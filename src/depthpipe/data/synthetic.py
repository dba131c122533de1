"""Procedural outdoor scenes, ray-cast in numpy, written in DIODE's and MegaDepth's own layouts.

The embedded data set lets the whole pipeline run with no download. World frame: x right, y up,
z forward, metres; the ground is the plane y = 0. A scene is a ring of buildings, boxes and poles
5 to 300 m around its origin; each scan puts a camera 1 to 2 m above the ground near the origin,
and each view of a scan looks in another direction with a small random pitch and roll.

Everything random comes from ``numpy.random.default_rng`` seeded by (seed, scene, scan, view),
and all arithmetic is float64 before quantising to the file's dtype, so the same params give
byte-identical files (tests/data/test_synthetic.py pins a digest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from depthpipe.data import diode
from depthpipe.data.synthetic_camera import (
    CAMERA_HEIGHT,
    DIODE_FX,
    DIODE_FY,
    DIODE_HEIGHT,
    DIODE_WIDTH,
    PITCH_DEGREES,
    SCANNER_RANGE,
)

HAZE_PER_METRE = 1.0 / 250.0  # extinction coefficient: half the contrast is gone at ~170 m
SKY_HORIZON = np.array([0.78, 0.84, 0.90])
SKY_ZENITH = np.array([0.30, 0.48, 0.80])
HAZE_COLOUR = np.array([0.80, 0.83, 0.87])

GROUND, BOX, POLE = 0, 1, 2  # surface kinds, for texturing
VIEW_ANGLES = 36 * 6  # 36 yaws (10 degree steps) x 6 tilt indices per scan


@dataclass(frozen=True)
class Box:
    centre: tuple[float, float]  # (x, z) of the footprint centre, metres
    half: tuple[float, float, float]  # half extents along the box's own x, y, z
    yaw: float  # radians about the vertical axis
    colour: tuple[float, float, float]
    windows: bool  # a building facade: window grid, glass gives no scanner return


@dataclass(frozen=True)
class Pole:
    centre: tuple[float, float]
    radius: float
    height: float
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class Scene:
    boxes: tuple[Box, ...]
    poles: tuple[Pole, ...]
    sun: tuple[float, float, float]  # unit vector towards the sun
    ground_colour: tuple[float, float, float]
    texture_seed: int


@dataclass(frozen=True)
class Camera:
    position: tuple[float, float, float]
    yaw: float  # radians, 0 = looking along +z
    pitch: float  # radians, positive = looking up
    roll: float
    width: int
    height: int

    def intrinsics(self) -> tuple[float, float, float, float]:
        """DIODE's focal lengths scaled to this image size; principal point at the centre."""
        fx = DIODE_FX * self.width / DIODE_WIDTH
        fy = DIODE_FY * self.height / DIODE_HEIGHT
        return fx, fy, self.width / 2.0, self.height / 2.0


def _polar(rng: np.random.Generator, r_min: float, r_max: float) -> tuple[float, float]:
    # Log-uniform radius: as many objects near as far, like a real street.
    radius = math.exp(rng.uniform(math.log(r_min), math.log(r_max)))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    return radius * math.sin(angle), radius * math.cos(angle)


def _colour(rng: np.random.Generator, lo: float, hi: float) -> tuple[float, float, float]:
    base = rng.uniform(lo, hi)
    tint = rng.uniform(-0.12, 0.12, size=3)
    red, green, blue = (float(v) for v in np.clip(base + tint, 0.05, 0.95))
    return red, green, blue


def make_scene(seed: int, scene_id: int) -> Scene:
    rng = np.random.default_rng([seed, scene_id, 0xD10DE])
    buildings = [
        Box(
            centre=_polar(rng, 25.0, 300.0),
            half=(rng.uniform(5, 30), rng.uniform(6, 40), rng.uniform(5, 20)),
            yaw=rng.uniform(0, math.pi),
            colour=_colour(rng, 0.35, 0.75),
            windows=True,
        )
        for _ in range(int(rng.integers(10, 18)))
    ]
    boxes = [
        Box(
            centre=_polar(rng, 6.0, 80.0),
            half=(rng.uniform(0.4, 2.5), rng.uniform(0.4, 2.0), rng.uniform(0.4, 2.5)),
            yaw=rng.uniform(0, math.pi),
            colour=_colour(rng, 0.2, 0.8),
            windows=False,
        )
        for _ in range(int(rng.integers(8, 16)))
    ]
    poles = [
        Pole(
            centre=_polar(rng, 5.0, 100.0),
            radius=rng.uniform(0.08, 0.4),
            height=rng.uniform(3.0, 12.0),
            colour=_colour(rng, 0.25, 0.6),
        )
        for _ in range(int(rng.integers(6, 14)))
    ]
    elevation, azimuth = rng.uniform(0.3, 1.1), rng.uniform(0, 2 * math.pi)
    sun = (
        math.cos(elevation) * math.sin(azimuth),
        math.sin(elevation),
        math.cos(elevation) * math.cos(azimuth),
    )
    return Scene(
        boxes=tuple(buildings + boxes),
        poles=tuple(poles),
        sun=sun,
        ground_colour=_colour(rng, 0.3, 0.55),
        texture_seed=int(rng.integers(0, 2**31)),
    )


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera-to-world rotation. Camera frame: x right, y down, z forward (image convention)."""
    flip_y = np.diag([1.0, -1.0, 1.0])  # image y is down, world y is up
    cr, sr = math.cos(roll), math.sin(roll)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(yaw), math.sin(yaw)
    r_roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    r_pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return r_yaw @ r_pitch @ r_roll @ flip_y


def camera_rays(camera: Camera) -> np.ndarray:
    """World ray directions, (H, W, 3), scaled so the camera-z component is 1.

    With that scaling the ray parameter t of a hit *is* its z-depth (distance along the optical
    axis), the quantity a depth map stores.
    """
    fx, fy, cx, cy = camera.intrinsics()
    u = (np.arange(camera.width) + 0.5 - cx) / fx
    v = (np.arange(camera.height) + 0.5 - cy) / fy
    uu, vv = np.meshgrid(u, v)
    cam = np.stack([uu, vv, np.ones_like(uu)], axis=-1)
    return cam @ _rotation(camera.yaw, camera.pitch, camera.roll).T


@dataclass
class Hits:
    """Nearest hit per ray so far: z-depth (inf = none), surface normal, kind and object index."""

    t: np.ndarray
    normal: np.ndarray
    kind: np.ndarray
    index: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> Hits:
        return cls(
            t=np.full(shape, np.inf),
            normal=np.zeros((*shape, 3)),
            kind=np.full(shape, -1, dtype=np.int16),
            index=np.full(shape, -1, dtype=np.int32),
        )

    def keep_nearer(self, t: np.ndarray, normal: np.ndarray, kind: int, index: int) -> None:
        nearer = (t > 1e-6) & (t < self.t)
        self.t[nearer] = t[nearer]
        self.normal[nearer] = normal[nearer] if normal.ndim == 3 else normal
        self.kind[nearer] = kind
        self.index[nearer] = index


def _hit_ground(origin: np.ndarray, rays: np.ndarray, hits: Hits) -> None:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(rays[..., 1] < 0, -origin[1] / rays[..., 1], np.inf)
    hits.keep_nearer(t, np.array([0.0, 1.0, 0.0]), GROUND, 0)


def _hit_box(origin: np.ndarray, rays: np.ndarray, box: Box, index: int, hits: Hits) -> None:
    """Slab test in the box's own frame (rotated by its yaw, resting on the ground)."""
    c, s = math.cos(box.yaw), math.sin(box.yaw)
    to_local = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    o = to_local @ (origin - np.array([box.centre[0], box.half[1], box.centre[1]]))
    d = rays @ to_local.T
    half = np.array(box.half)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1, t2 = (-half - o) * inv, (half - o) * inv
    t_near = np.minimum(t1, t2)
    t_far = np.maximum(t1, t2).min(axis=-1)
    entry_axis = t_near.argmax(axis=-1)
    t_enter = t_near.max(axis=-1)
    t = np.where((t_enter <= t_far) & (t_far > 0), t_enter, np.inf)
    # Normal of the entered face: along its axis, against the ray, back in world orientation.
    local_normal = np.zeros_like(d)
    axis_d = np.take_along_axis(d, entry_axis[..., None], axis=-1)[..., 0]
    np.put_along_axis(local_normal, entry_axis[..., None], -np.sign(axis_d)[..., None], axis=-1)
    hits.keep_nearer(t, local_normal @ to_local, BOX, index)


def _hit_pole(origin: np.ndarray, rays: np.ndarray, pole: Pole, index: int, hits: Hits) -> None:
    """Vertical cylinder on the ground: solve |(o + t d) - c|^2 = r^2 in the ground plane."""
    ox, oz = origin[0] - pole.centre[0], origin[2] - pole.centre[1]
    dx, dz = rays[..., 0], rays[..., 2]
    a = dx * dx + dz * dz
    b = 2.0 * (ox * dx + oz * dz)
    c = ox * ox + oz * oz - pole.radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    y = origin[1] + t * rays[..., 1]
    t = np.where((disc > 0) & (y >= 0) & (y <= pole.height), t, np.inf)
    nx, nz = ox + t * dx, oz + t * dz
    normal = np.stack([nx, np.zeros_like(nx), nz], axis=-1) / pole.radius
    hits.keep_nearer(t, np.nan_to_num(normal), POLE, index)


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic per-lattice-point noise in [0, 1), from integer mixing (no float libm)."""
    mixed = ix.astype(np.int64) * 73856093 ^ iy.astype(np.int64) * 19349663 ^ seed * 83492791
    h = mixed.astype(np.uint64) & np.uint64(0xFFFFFFFF)
    h = (h ^ (h >> np.uint64(13))) * np.uint64(0x5BD1E995) & np.uint64(0xFFFFFFFF)
    h = h ^ (h >> np.uint64(15))
    return (h & np.uint64(0xFFFF)).astype(np.float64) / 65536.0


def _value_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth noise: lattice hashes blended with a smoothstep, in [0, 1)."""
    ix, iy = np.floor(x), np.floor(y)
    fx, fy = x - ix, y - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    n00, n10 = _hash01(ix, iy, seed), _hash01(ix + 1, iy, seed)
    n01, n11 = _hash01(ix, iy + 1, seed), _hash01(ix + 1, iy + 1, seed)
    return (n00 * (1 - fx) + n10 * fx) * (1 - fy) + (n01 * (1 - fx) + n11 * fx) * fy


def _texture(u: np.ndarray, v: np.ndarray, seed: int) -> np.ndarray:
    """Multi-scale texture so no surface is flat colour (depth must not be read off shading)."""
    coarse = _value_noise(u / 4.0, v / 4.0, seed)
    medium = _value_noise(u, v, seed + 1)
    fine = _hash01(np.floor(u * 8), np.floor(v * 8), seed + 2)
    return 0.45 + 0.2 * coarse + 0.25 * medium + 0.2 * fine


def _surface_coords(points: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates on a surface: the ground uses (x, z), walls use (along-wall, height)."""
    horizontal = np.abs(normal[..., 1]) > 0.5
    along = points[..., 0] * normal[..., 2] - points[..., 2] * normal[..., 0]
    u = np.where(horizontal, points[..., 0], along)
    v = np.where(horizontal, points[..., 2], points[..., 1])
    return u, v


def _windows(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Facade window grid: 3 m bays, 3.5 m storeys; True on glass."""
    bay, storey = np.mod(u, 3.0) / 3.0, np.mod(v, 3.5) / 3.5
    return (bay > 0.2) & (bay < 0.8) & (storey > 0.3) & (storey < 0.8) & (v > 2.0)


def _albedo(scene: Scene, hits: Hits, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surface colour (H, W, 3) and a glass mask (H, W) of pixels that return no laser echo."""
    shape = hits.t.shape
    colours = np.zeros((*shape, 3))
    glass = np.zeros(shape, dtype=bool)
    u, v = _surface_coords(points, hits.normal)
    pattern = _texture(u, v, scene.texture_seed)
    ground = hits.kind == GROUND
    colours[ground] = np.array(scene.ground_colour)
    for i, box in enumerate(scene.boxes):
        on = (hits.kind == BOX) & (hits.index == i)
        colours[on] = np.array(box.colour)
        if box.windows:
            glass |= on & _windows(u, v) & (np.abs(hits.normal[..., 1]) < 0.5)
    for i, pole in enumerate(scene.poles):
        colours[(hits.kind == POLE) & (hits.index == i)] = np.array(pole.colour)
    colours *= pattern[..., None]
    colours[glass] = np.array([0.12, 0.16, 0.22]) + 0.3 * colours[glass]
    return colours, glass


def _sky(rays: np.ndarray) -> np.ndarray:
    elevation = rays[..., 1] / np.linalg.norm(rays, axis=-1)
    w = np.clip(elevation, 0.0, 1.0)[..., None] ** 0.6
    return SKY_HORIZON * (1 - w) + SKY_ZENITH * w


def render(scene: Scene, camera: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast one view.

    Returns:
        image (H, W, 3) uint8, depth (H, W) float32 z-depth in metres (0 where invalid),
        mask (H, W) bool (False for sky, glass and anything beyond the scanner's range).
    """
    origin = np.array(camera.position)
    rays = camera_rays(camera)
    hits = Hits.empty(rays.shape[:2])
    _hit_ground(origin, rays, hits)
    for i, box in enumerate(scene.boxes):
        _hit_box(origin, rays, box, i, hits)
    for i, pole in enumerate(scene.poles):
        _hit_pole(origin, rays, pole, i, hits)

    hit = np.isfinite(hits.t)
    t = np.where(hit, hits.t, 0.0)
    points = origin + rays * t[..., None]
    albedo, glass = _albedo(scene, hits, points)
    lambert = np.clip(hits.normal @ np.array(scene.sun), 0.0, 1.0)
    lit = albedo * (0.35 + 0.75 * lambert)[..., None]
    distance = t * np.linalg.norm(rays, axis=-1)  # along the ray, for haze
    transmit = np.exp(-HAZE_PER_METRE * distance)[..., None]
    colour = np.where(hit[..., None], lit * transmit + HAZE_COLOUR * (1 - transmit), _sky(rays))

    valid = hit & ~glass & (t <= SCANNER_RANGE)
    image = np.clip(np.round(colour * 255.0), 0, 255).astype(np.uint8)
    depth = np.where(valid, t, 0.0).astype(np.float32)
    return image, depth, valid


def view_camera(
    seed: int, scene_id: int, scan_id: int, view: int, width: int, height: int
) -> tuple[Camera, int, int]:
    """The camera of one view and its DIODE name angles (AAA = yaw degrees, BBB = tilt index)."""
    scan_rng = np.random.default_rng([seed, scene_id, scan_id, 0x5CA7])
    x, z = scan_rng.uniform(-4, 4, size=2)
    cam_height = scan_rng.uniform(*CAMERA_HEIGHT)
    # Distinct (yaw, tilt) per view of a scan, so no two views share a file name.
    code = int(scan_rng.permutation(VIEW_ANGLES)[view % VIEW_ANGLES])
    yaw_deg, tilt = (code // 6) * 10, (code % 6) * 10
    rng = np.random.default_rng([seed, scene_id, scan_id, view])
    camera = Camera(
        position=(float(x), float(cam_height), float(z)),
        yaw=math.radians(yaw_deg),
        pitch=math.radians(rng.uniform(*PITCH_DEGREES)),
        roll=math.radians(rng.uniform(-3.0, 3.0)),
        width=width,
        height=height,
    )
    return camera, yaw_deg, tilt


def write_diode_split(
    root: Path,
    split: str,
    scene_ids: range,
    scans: int,
    views: int,
    size: tuple[int, int],
    seed: int,
    *,
    domain: str,
) -> int:
    """Render ``scans`` x ``views`` samples per scene into DIODE's layout under ``domain``'s
    folder (the scenes are the same kind of street for either domain); return the count."""
    width, height = size
    count = 0
    for scene_id in scene_ids:
        scene = make_scene(seed, scene_id)
        for scan_index in range(scans):
            scan_id = scene_id * 100 + scan_index
            for view in range(views):
                camera, a, b = view_camera(seed, scene_id, scan_id, view, width, height)
                files = diode.sample_files(root, split, domain, scene_id, scan_id, a, b)
                _write_diode_sample(files, *render(scene, camera))
                count += 1
    return count


def _write_diode_sample(
    files: diode.SampleFiles, image: np.ndarray, depth: np.ndarray, mask: np.ndarray
) -> None:
    files.folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(files.image, format="PNG")
    np.save(files.depth, depth[..., None])  # (H, W, 1) float32 metres, as DIODE ships it
    np.save(files.mask, mask.astype(np.float32))  # (H, W) 0/1 float, as DIODE ships it


# MegaDepth photos come in many shapes; each scene gets one (width, height) ratio from these.
MEGADEPTH_ASPECTS = ((4, 3), (3, 4), (16, 9), (3, 2), (1, 1))


def megadepth_image_name(seed: int, scene_id: int, index: int) -> str:
    """A Flickr-like name, as MegaDepth's files have (e.g. 1000431384_c5ab5e5a49_o.jpg)."""
    rng = np.random.default_rng([seed, scene_id, index, 0xF11C])
    photo = int(rng.integers(10**9, 10**10))
    secret = "".join(f"{int(b):02x}" for b in rng.integers(0, 256, size=5))
    return f"{photo}_{secret}_o.jpg"


def write_megadepth(root: Path, scenes: int, per_scene: int, long_side: int, seed: int) -> int:
    """Render MegaDepth_v1/<scene>/dense0/imgs/*.jpg; image size varies by scene."""
    count = 0
    for scene_index in range(scenes):
        scene_id = 5000 + scene_index  # MegaDepth scene folders are 4-digit numbers
        scene = make_scene(seed, scene_id)
        rng = np.random.default_rng([seed, scene_id, 0xA5])
        aw, ah = MEGADEPTH_ASPECTS[int(rng.integers(0, len(MEGADEPTH_ASPECTS)))]
        scene_long = int(long_side * rng.uniform(0.6, 1.0))
        scale = scene_long / max(aw, ah)
        width, height = max(16, round(aw * scale)), max(16, round(ah * scale))
        folder = root / "MegaDepth_v1" / f"{scene_id:04d}" / "dense0" / "imgs"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_scene):
            camera, _, _ = view_camera(seed, scene_id, index // 4, index, width, height)
            image, _, _ = render(scene, camera)
            name = megadepth_image_name(seed, scene_id, index)
            Image.fromarray(image).save(folder / name, format="JPEG", quality=90)
            count += 1
    return count
