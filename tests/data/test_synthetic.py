from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
from PIL import Image

from depthpipe.config import load_params
from depthpipe.data import diode, synthetic, synthetic_camera
from depthpipe.paths import project_paths
from depthpipe.stages import fetch
from tests.helpers import write_params

NAME = re.compile(r"^(\d{5})_(\d{5})_outdoor_(\d{3})_(\d{3})$")


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_fetch__same_params_give_byte_identical_files(tiny_project: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "params.yaml").write_text((tiny_project / "params.yaml").read_text())
    for root in (tiny_project, other):
        paths = project_paths(root)
        fetch.run(load_params(paths.params), paths)
    for sub in ("data/raw/diode", "data/raw/megadepth"):
        assert _digest(tiny_project / sub) == _digest(other / sub)


def test_fetch__training_seed_leaves_the_data_alone(tmp_path: Path) -> None:
    """`seed` is training randomness only; `data.seed` alone changes the scenes."""
    digests = {}
    for name, override in (
        ("base", {}),
        ("training_seed", {"seed": 1}),
        ("data_seed", {"data": {"seed": 1}}),
    ):
        root = tmp_path / name
        root.mkdir()
        write_params(root, override)
        paths = project_paths(root)
        fetch.run(load_params(paths.params), paths)
        digests[name] = _digest(paths.raw_diode)
    assert digests["training_seed"] == digests["base"]
    assert digests["data_seed"] != digests["base"]


def test_render__pinned_digest() -> None:
    """Guards cross-machine determinism: a change in numpy, PIL or the renderer shows up here."""
    scene = synthetic.make_scene(0, 1)
    camera, _, _ = synthetic.view_camera(0, 1, 100, 0, 64, 48)
    image, depth, mask = synthetic.render(scene, camera)
    digest = hashlib.sha256(image.tobytes() + depth.tobytes() + mask.tobytes()).hexdigest()
    assert digest[:16] == PINNED_RENDER_DIGEST


def test_view_camera__every_view_of_a_scan_has_its_own_file_name() -> None:
    """DIODE names a view by its angles: two views with equal angles would overwrite a file."""
    names = {synthetic.view_camera(0, 1, 100, v, 64, 48)[1:] for v in range(synthetic.VIEW_ANGLES)}
    assert len(names) == synthetic.VIEW_ANGLES


PINNED_RENDER_DIGEST = "52e6a2a24e661bc5"  # update only on purpose


def test_fetch__diode_layout_dtypes_and_validity(tiny_project: Path) -> None:
    paths = project_paths(tiny_project)
    counts = fetch.run(load_params(paths.params), paths)
    assert counts == {"diode_train": 9, "diode_val": 3, "megadepth": 8}
    for split, expected in (("train", 9), ("val", 3)):
        samples = diode.list_samples(paths.raw_diode, split)
        assert len(samples) == expected
        for files in samples:
            match = NAME.match(files.stem)
            assert match, files.stem
            scene_id, scan_id = match.group(1), match.group(2)
            assert (
                files.folder
                == paths.raw_diode / split / "outdoor" / f"scene_{scene_id}" / f"scan_{scan_id}"
            )
            image = Image.open(files.image)
            assert (image.mode, image.size) == ("RGB", (64, 48))
            depth, mask = np.load(files.depth), np.load(files.mask)
            assert depth.dtype == np.float32 and depth.shape == (48, 64, 1)
            assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0.0, 1.0}
            valid = mask > 0
            assert np.all(depth[..., 0][~valid] == 0)  # invalid (sky, glass, far) is 0, as DIODE
            assert np.all(depth[..., 0][valid] > 0.5) and np.all(depth[..., 0][valid] <= 350)
            assert valid[-1].all(), "bottom row sees the ground close by"
            assert not valid.all(), "some sky or out-of-range pixels must be invalid"
    train_scenes = {s.scene for s in diode.list_samples(paths.raw_diode, "train")}
    val_scenes = {s.scene for s in diode.list_samples(paths.raw_diode, "val")}
    assert len(train_scenes) == 3 and not train_scenes & val_scenes


def test_render__sky_invalid_and_textured() -> None:
    scene = synthetic.make_scene(0, 2)
    camera = synthetic.Camera(
        position=(0.0, 1.5, 0.0), yaw=0.0, pitch=0.6, roll=0.0, width=80, height=60
    )
    image, depth, mask = synthetic.render(scene, camera)
    # looking 34 degrees up: the top row is sky unless a building is in the way
    assert (~mask[0]).mean() > 0.3
    assert np.all(depth[~mask] == 0)
    ground = synthetic.Camera(
        position=(0.0, 1.5, 0.0), yaw=0.0, pitch=-0.5, roll=0.0, width=80, height=60
    )
    image, depth, mask = synthetic.render(scene, ground)
    bottom = image[-10:].reshape(-1, 3).astype(float)
    assert bottom.std(axis=0).max() > 3.0, "ground must be textured, not flat colour"
    # z-depth of the ground at the bottom row: height / tan(angle below the horizon) / cos ...
    assert 1.0 < depth[-1].mean() < 5.0


def test_fetch__megadepth_layout_sizes_vary_by_scene(tiny_project: Path) -> None:
    paths = project_paths(tiny_project)
    fetch.run(load_params(paths.params), paths)
    images = sorted((paths.raw_megadepth / "MegaDepth_v1").glob("*/dense0/imgs/*.jpg"))
    assert len(images) == 8
    sizes_by_scene: dict[str, set] = {}
    for path in images:
        assert re.match(r"^\d{10}_[0-9a-f]{10}_o\.jpg$", path.name)
        with Image.open(path) as img:
            assert img.format == "JPEG"
            sizes_by_scene.setdefault(path.parts[-4], set()).add(img.size)
    assert all(len(s) == 1 for s in sizes_by_scene.values())  # one size within a scene
    assert len(sizes_by_scene) == 2 and all(re.match(r"^\d{4}$", s) for s in sizes_by_scene)
    assert len({size for sizes in sizes_by_scene.values() for size in sizes}) == 2  # differ


def test_nearest_ground_depth__the_lowest_camera_looking_down_sees_ground_just_beyond_it() -> None:
    """The bound config checks depth ranges with: an empty street seen by the lowest camera,
    pitched down the most, has its nearest ground at the bottom edge of the frame."""
    empty = synthetic.Scene(
        boxes=(), poles=(), sun=(0.0, 1.0, 0.0), ground_colour=(0.5, 0.5, 0.5), texture_seed=0
    )
    camera = synthetic.Camera(
        position=(0.0, synthetic_camera.CAMERA_HEIGHT[0], 0.0),
        yaw=0.0,
        pitch=np.radians(synthetic_camera.PITCH_DEGREES[0]),
        roll=0.0,
        width=256,
        height=192,
    )
    _, depth, valid = synthetic.render(empty, camera)
    nearest = synthetic_camera.nearest_ground_depth()
    closest = float(depth[valid].min())
    # pixel centres sit half a pixel inside the frame's edge, so a little farther than the edge
    assert nearest <= closest <= nearest * 1.02
    assert valid[-1].all()  # the bottom row is ground, valid in every column


def test_every_view_shows_ground__highest_camera_looking_up_most_at_the_smallest_size() -> None:
    """Why no data.synthetic value can empty a split (config's check): at the other extreme
    of the camera's draws, highest, pitched up and rolled the most, at the schema's smallest
    size, the bottom row still sees valid ground."""
    empty = synthetic.Scene(
        boxes=(), poles=(), sun=(0.0, 1.0, 0.0), ground_colour=(0.5, 0.5, 0.5), texture_seed=0
    )
    for roll in (-3.0, 3.0):
        camera = synthetic.Camera(
            position=(0.0, synthetic_camera.CAMERA_HEIGHT[1], 0.0),
            yaw=0.0,
            pitch=np.radians(synthetic_camera.PITCH_DEGREES[1]),
            roll=np.radians(roll),
            width=32,
            height=24,
        )
        _, depth, valid = synthetic.render(empty, camera)
        assert valid[-1].all(), roll
        assert depth[-1].max() < synthetic_camera.SCANNER_RANGE
