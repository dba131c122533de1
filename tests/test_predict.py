from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from depthpipe import predict
from depthpipe.errors import DepthpipeError
from depthpipe.model import DepthPrediction
from depthpipe.paths import project_paths
from tests.helpers import run_main, run_module


def test_predict__odd_sized_rgba_and_exif(
    scored_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rgba = np.random.default_rng(0).integers(0, 255, size=(37, 53, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "odd.png")
    rotated = Image.new("RGB", (40, 30), (120, 130, 140))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rotated.save(tmp_path / "phone.jpg", exif=exif)
    Image.new("L", (33, 21), 90).save(tmp_path / "grey.png")
    out = tmp_path / "out"
    model = project_paths(scored_project).finetune_dir("scratch")
    status = run_main(
        predict.main,
        str(tmp_path / "odd.png"),
        str(tmp_path / "phone.jpg"),
        str(tmp_path / "grey.png"),
        "--model",
        str(model),
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert status == 0, capsys.readouterr().err[-2000:]
    for stem, shape in (("odd", (37, 53)), ("phone", (40, 30)), ("grey", (21, 33))):
        depth = np.load(out / f"{stem}_depth.npy")
        assert depth.dtype == np.float32 and depth.shape == shape
        assert np.isfinite(depth).all() and depth.min() >= 0.6 and depth.max() <= 350
        with Image.open(out / f"{stem}_depth.png") as picture:
            assert picture.size == (shape[1], shape[0]) and picture.mode == "RGB"


def test_predict__folder_with_corrupt_file(
    scored_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 80, 120)).save(folder / f"ok{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    model = project_paths(scored_project).finetune_dir("scratch") / "model.pt"
    status = run_main(
        predict.main, str(folder), "--model", str(model), "--out", str(out), cwd=tmp_path
    )
    assert status == 1
    assert "broken.jpg" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.npy")) == [f"ok{i}_depth.npy" for i in range(3)]
    assert not list(out.glob("broken*")) and not list(out.glob(".*"))


def test_predict__missing_model_is_clear(tmp_path: Path) -> None:
    """The one test of the real command line (``python -m``, exit status and stderr of the
    process); the others call its main in-process (run_main)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]
    result = run_module("depthpipe.predict", *args, cwd=tmp_path)
    assert result.returncode == 2 and "model description not found" in result.stderr


def test_predict__an_encoder_as_model_says_which_artifact_to_use(tmp_path: Path) -> None:
    """Encoders and fine-tuned networks are both registry models (encoder-*, depth-*): an
    encoder file or folder is named as such, before any output is made."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    encoder = tmp_path / "encoder-conservative" / "encoder.pt"
    encoder.parent.mkdir()
    encoder.write_bytes(b"any content: only the name is looked at")
    out = tmp_path / "out"
    for model in (encoder, encoder.parent):
        with pytest.raises(DepthpipeError) as raised:
            predict.predict_files([tmp_path / "a.png"], model, out)
        assert str(raised.value).startswith(f"{model}: an encoder, not a fine-tuned depth network")
        assert "dvc artifacts get <repo> depth-<name>" in str(raised.value)
        assert not out.exists()


def png_claiming(path: Path, width: int, height: int) -> None:
    """A valid PNG header announcing ``width`` x ``height`` RGB pixels, in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_predict__decompression_bomb_is_skipped(
    scored_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    png_claiming(folder / "bomb.png", 100_000, 100_000)
    Image.new("RGB", (64, 48), (90, 120, 150)).save(folder / "fine.png")
    out = tmp_path / "out"
    model = str(project_paths(scored_project).finetune_dir("scratch"))
    # an exception escaping main (the subprocess's traceback) fails the test here
    status = run_main(predict.main, str(folder), "--model", model, "--out", str(out), cwd=tmp_path)
    stderr = capsys.readouterr().err
    assert status == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    assert f"skipped {folder / 'bomb.png'}: too large: 100000x100000" in stderr
    assert "10,000,000,000 pixels" in stderr and f"{predict.MAX_PIXELS:,}" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["fine_depth.npy", "fine_depth.png"]


def read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder / "out"


def under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path / "a_file" / "out"


@pytest.mark.parametrize(
    "make_out",
    [
        under_a_file,
        pytest.param(
            read_only_folder,
            marks=pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere"),
        ),
    ],
)
def test_predict__unwritable_output_is_one_clear_line(
    scored_project: Path,
    tmp_path: Path,
    make_out: Callable[[Path], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    out = make_out(tmp_path)
    model = str(project_paths(scored_project).finetune_dir("scratch"))
    status = run_main(
        predict.main, str(tmp_path / "a.png"), "--model", model, "--out", str(out), cwd=tmp_path
    )
    stderr = capsys.readouterr().err
    assert status == 2 and "Traceback" not in stderr
    (line,) = stderr.strip().splitlines()  # in-process: no library import warnings before it
    assert line.startswith(f"error: {out}: cannot write the output folder: ")


@pytest.mark.parametrize("via_file", [True, False], ids=["I;16 png", "mode I"])
def test_predict__sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path, via_file: bool) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    if via_file:
        Image.fromarray(values).save(tmp_path / "deep.png")
        with Image.open(tmp_path / "deep.png") as check:
            assert check.mode in predict.SIXTEEN_BIT_MODES  # really 16 bits on disk
        rgb = np.asarray(predict.load_photo(tmp_path / "deep.png"))
    else:
        rgb = np.asarray(predict.to_rgb(Image.fromarray(values.astype(np.int32), mode="I")))
    expected = np.array([0, 1, 128, 255], dtype=np.uint8)  # 0..65535 onto 0..255
    np.testing.assert_array_equal(rgb, np.repeat(expected[None, :, None], 3, axis=2))


@pytest.mark.parametrize(
    ("transparency", "second_pixel"),
    [(0, (200, 100, 50)), (b"\x00\x80", (227, 177, 152))],  # index 1 opaque, or half on white
    ids=["transparent index", "alpha per entry"],
)
def test_predict__palette_transparency_composited_on_white(
    tmp_path: Path, transparency: int | bytes, second_pixel: tuple[int, int, int]
) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 100, 50])  # index 0 is black under its zero alpha
    palette.putdata([0, 1])
    palette.save(tmp_path / "palette.png", transparency=transparency)
    rgb = np.asarray(predict.load_photo(tmp_path / "palette.png")).astype(int)
    np.testing.assert_array_equal(rgb[0, 0], (255, 255, 255))
    np.testing.assert_allclose(rgb[0, 1], second_pixel, atol=1)


def test_predict__outputs_written_in_strips_equal_the_whole_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_depth = np.random.default_rng(0).uniform(-0.5, 5.8, size=(6, 8)).astype(np.float32)
    prediction = DepthPrediction(log_depth, 45, 61, 0.6, 350.0)
    monkeypatch.setattr(predict, "STRIP_PIXELS", 61 * 4)  # 12 strips of 4 rows, the last 1 row
    predict.write_outputs(prediction, tmp_path, "x")
    whole = prediction.full()
    np.testing.assert_array_equal(np.load(tmp_path / "x_depth.npy"), whole)
    with Image.open(tmp_path / "x_depth.png") as picture:
        coloured = np.asarray(picture)
    np.testing.assert_array_equal(
        coloured, predict.colourise(whole, predict.colour_range(prediction))
    )
    # and the whole map is torch's bilinear upsampling of the log depth, exp, clamped
    reference = F.interpolate(
        torch.from_numpy(log_depth)[None, None], size=(45, 61), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(whole, reference[0, 0].exp().clamp(0.6, 350.0).numpy(), rtol=1e-5)
