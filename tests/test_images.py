import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dreambooth.data import open_rgb, scan_folder
from dreambooth.errors import DataError


def png_header_only(path, width, height):
    """A PNG whose header declares width x height but holds no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_modes_become_rgb(tmp_path):
    Image.new("L", (10, 10), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("P", (10, 10), 3).save(tmp_path / "palette.png")
    for name in ("gray.png", "rgba.png", "cmyk.jpg", "palette.png"):
        img = open_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (10, 10), name
    assert open_rgb(tmp_path / "gray.png").getpixel((0, 0)) == (128, 128, 128)
    assert open_rgb(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    r, g, b = open_rgb(tmp_path / "cmyk.jpg").getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert open_rgb(tmp_path / "deep.png").getpixel((0, 0)) == (128, 128, 128)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_rgb(tmp_path / "rotated.jpg").size == (10, 20)


def test_truncated_and_corrupt_images_fail_with_their_names(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big.save(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:400])
    (tmp_path / "whole.jpg").unlink()
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" + data[:5])
    with pytest.raises(DataError) as e:
        scan_folder(tmp_path, "instance")
    msg = str(e.value)
    assert "2 instance image(s)" in msg and "cut.jpg" in msg and "garbage.png" in msg and "\n" not in msg
    assert "remove or replace" in msg


def test_decompression_bomb_is_refused(tmp_path):
    png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(DataError, match="too large"):
        open_rgb(tmp_path / "bomb.png")


def test_non_images_skipped_with_warning_and_small_images_warned(tmp_path, caplog):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "small.png")
    Image.new("RGB", (128, 96), "red").save(tmp_path / "big.png")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        found = scan_folder(tmp_path, "instance", resolution=64)
    assert [p.name for p in found.images] == ["big.png", "small.png"]
    assert [p.name for p in found.skipped] == ["notes.txt"]
    assert [p.name for p in found.small] == ["small.png"]
    assert "notes.txt" in caplog.text and "upscaled" in caplog.text


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nope", "instance")
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(DataError, match="is a file"):
        scan_folder(tmp_path / "f.png", "instance")
