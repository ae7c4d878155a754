"""Image checks against real files on disk, one per defect."""

import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdtune.data.images import BadImage, check_folder, load_rgb
from sdtune.errors import UserError


def noisy(size=(64, 48), mode="RGB", seed=0):
    # noise so that JPEG bodies are long enough to cut in half meaningfully
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(), mode)


def png_with_header_size(path, width, height):
    """A PNG whose IHDR claims width x height, followed by a tiny (wrong) body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def by_file(verdicts):
    return {v["file"]: v for v in verdicts}


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    return d


def test_good_images_with_unusual_names_are_kept(raw):
    (raw / "sub dir").mkdir()
    noisy().save(raw / "good.png")
    noisy(seed=1).save(raw / "My Photo ü.JPG", format="JPEG")
    noisy(seed=2).save(raw / "sub dir" / "shape.PnG", format="PNG")
    noisy(seed=3).save(raw / "x.webp", format="WEBP")
    noisy(seed=4).save(raw / "y.tif", format="TIFF")
    (raw / "good.txt").write_text("a caption")
    (raw / "good.caption").write_text("a caption")
    (raw / "raw.manifest.json").write_text("{}")
    verdicts = check_folder(raw, min_side=32)
    assert [v["file"] for v in verdicts] == sorted(
        ["good.png", "My Photo ü.JPG", "sub dir/shape.PnG", "x.webp", "y.tif"])
    for v in verdicts:
        assert (v["status"], v["reason"], v["warnings"]) == ("kept", None, []), v
        assert (v["width"], v["height"]) == (64, 48)
        assert len(v["sha256"]) == 64


@pytest.mark.parametrize("name, make, reason", [
    ("page.jpg", lambda p: p.write_text("<!DOCTYPE html><html><body>Sign in</body></html>"), "HTML"),
    ("notes.jpg", lambda p: p.write_text("just some text\n"), "text file"),
    ("noise.png", lambda p: p.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8))),
     "not an image"),
    ("empty.jpg", lambda p: p.write_bytes(b""), "empty file"),
])
def test_files_that_are_not_images(raw, name, make, reason):
    make(raw / name)
    (v,) = check_folder(raw, min_side=8)
    assert v["status"] == "skipped" and reason in v["reason"], v
    if name != "empty.jpg":
        assert v["reason"].startswith("not an image")


def test_truncated_and_corrupt(raw):
    noisy().save(raw / "whole.jpg", quality=95)
    data = (raw / "whole.jpg").read_bytes()
    (raw / "cut.jpg").write_bytes(data[: len(data) // 2])
    noisy(seed=1).save(raw / "whole.png")
    data = (raw / "whole.png").read_bytes()
    (raw / "cut.png").write_bytes(data[: len(data) // 2])
    (raw / "stub.png").write_bytes(data[:20])  # cut inside the header
    # a valid PNG header and IHDR, then an IDAT full of bytes that are not zlib
    good = bytearray((raw / "whole.png").read_bytes())
    start = good.index(b"IDAT") + 4
    good[start:start + 64] = b"\xff" * 64
    (raw / "scrambled.png").write_bytes(bytes(good))
    v = by_file(check_folder(raw, min_side=8))
    assert v["whole.jpg"]["status"] == v["whole.png"]["status"] == "kept"
    assert v["cut.jpg"]["status"] == "skipped" and v["cut.jpg"]["reason"].startswith("truncated")
    assert v["cut.png"]["status"] == "skipped" and v["cut.png"]["reason"].startswith(("truncated", "corrupt"))
    assert v["stub.png"]["reason"].startswith("truncated")
    assert v["scrambled.png"]["status"] == "skipped"
    assert v["scrambled.png"]["reason"].startswith(("corrupt", "truncated", "unreadable"))


def test_bomb_is_refused_from_its_header(raw):
    png_with_header_size(raw / "bomb.png", 100_000, 100_000)  # 10^10 pixels, a few bytes on disk
    with pytest.raises(Image.DecompressionBombError):  # what Pillow alone would throw
        Image.open(raw / "bomb.png")
    (v,) = check_folder(raw, min_side=8)
    assert v["status"] == "skipped"
    assert v["reason"].startswith("too many pixels: 100000x100000")
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's global limit is restored


def test_max_pixels_is_the_users_limit(raw):
    noisy((64, 48)).save(raw / "a.png")
    (v,) = check_folder(raw, min_side=8, max_pixels=64 * 48 - 1)
    assert v["status"] == "skipped" and "max_pixels 3,071" in v["reason"]
    (v,) = check_folder(raw, min_side=8, max_pixels=64 * 48)
    assert v["status"] == "kept"


def test_max_pixels_reaches_every_later_read(raw, tmp_path):
    from sdtune.data import cache
    from sdtune.data.captions import contact_sheet

    noisy((64, 48)).save(raw / "a.png")
    with pytest.raises(BadImage, match="max_pixels 3,071"):
        cache.prepare(raw / "a.png", 32, True, max_pixels=64 * 48 - 1)
    assert cache.prepare(raw / "a.png", 32, True, max_pixels=64 * 48)[0].shape == (3, 32, 32)
    rows = [{"file": "a.png", "caption": "a"}]
    with pytest.raises(BadImage, match="max_pixels 3,071"):
        contact_sheet(raw, rows, tmp_path / "sheet.png", max_pixels=64 * 48 - 1)


def test_too_small_skip_or_upscale(raw):
    noisy((40, 20)).save(raw / "small.png")
    (v,) = check_folder(raw, min_side=32, too_small="skip")
    assert v["status"] == "skipped" and v["reason"] == "too small: short side 20 px < min_side 32"
    (v,) = check_folder(raw, min_side=32, too_small="upscale")
    assert v["status"] == "kept" and v["warnings"] == ["short side 20 px < min_side 32; will be upscaled"]
    with pytest.raises(UserError, match="too_small"):
        check_folder(raw, min_side=32, too_small="crop")


def test_with_buckets_too_small_means_smaller_than_its_bucket(raw):
    """800x400 at 512 is short for a square, but its 2:1 bucket (704x320) needs no upscaling."""
    noisy((800, 400)).save(raw / "wide.png")
    (v,) = check_folder(raw, min_side=512, too_small="skip")
    assert v["status"] == "skipped"
    (v,) = check_folder(raw, min_side=512, bucket_step=64, too_small="skip")
    assert v["status"] == "kept" and v["warnings"] == []
    (v,) = check_folder(raw, min_side=1024, bucket_step=64, too_small="skip")
    assert v["reason"] == "too small: 800x400 px < its bucket 1408x704"


def test_with_buckets_one_short_side_is_too_small(raw):
    """80x40 at 64 (step 8): its 2:1 bucket is 88x40; the height fits, the width does not."""
    noisy((80, 40)).save(raw / "wide.png")
    (v,) = check_folder(raw, min_side=64, bucket_step=8, too_small="skip")
    assert v["status"] == "skipped" and v["reason"] == "too small: 80x40 px < its bucket 88x40"


def test_a_panoramas_bucket_is_clipped_to_two_to_one(raw):
    """200x30 (about 6.7:1) gets the 2:1 bucket, 88x40 at 64: no bucket is narrower than 1:2
    or wider than 2:1, so the strip is too short for it."""
    noisy((200, 30)).save(raw / "panorama.png")
    (v,) = check_folder(raw, min_side=64, bucket_step=8, too_small="skip")
    assert v["reason"] == "too small: 200x30 px < its bucket 88x40"
    noisy((30, 200)).save(raw / "panorama.png")
    (v,) = check_folder(raw, min_side=64, bucket_step=8, too_small="skip")
    assert v["reason"] == "too small: 30x200 px < its bucket 40x88"


def test_an_image_exactly_at_the_resolution_is_not_too_small(raw):
    noisy((32, 40)).save(raw / "exact.png")
    (v,) = check_folder(raw, min_side=32, too_small="skip")
    assert v["status"] == "kept" and v["warnings"] == []


def test_duplicates_and_symlinks(raw, tmp_path):
    (raw / "b").mkdir()
    noisy().save(raw / "a.png")
    shutil.copy(raw / "a.png", raw / "b" / "copy.png")
    outside = tmp_path / "secret.png"
    noisy(seed=9).save(outside)
    os.symlink(outside, raw / "link_out.png")
    os.symlink(tmp_path, raw / "link_dir")
    os.symlink(raw / "missing.png", raw / "dangling.png")
    v = by_file(check_folder(raw, min_side=8))
    assert v["a.png"]["status"] == "kept"
    assert v["b/copy.png"]["status"] == "skipped"
    assert v["b/copy.png"]["reason"] == "exact duplicate of a.png"
    assert v["link_out.png"]["status"] == "skipped" and "outside the raw folder" in v["link_out.png"]["reason"]
    assert v["link_out.png"]["sha256"] is None  # the target was never read
    assert v["link_dir"]["status"] == "skipped"
    assert v["dangling.png"]["status"] == "skipped" and "broken symlink" in v["dangling.png"]["reason"]


def test_symlink_loop_is_a_skipped_file_not_a_crash(raw):
    noisy().save(raw / "a.png")
    os.symlink("loop_b.png", raw / "loop_a.png")
    os.symlink("loop_a.png", raw / "loop_b.png")
    os.symlink("self.png", raw / "self.png")
    v = by_file(check_folder(raw, min_side=8))
    assert v["a.png"]["status"] == "kept"
    for name in ("loop_a.png", "loop_b.png", "self.png"):
        assert v[name]["status"] == "skipped" and "symlink loop" in v[name]["reason"]
        assert v[name]["sha256"] is None


def test_exif_rotation_swaps_the_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    noisy((40, 20)).save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (20, 40)
    (v,) = check_folder(tmp_path, min_side=8)
    assert (v["width"], v["height"]) == (20, 40)


def test_modes_become_8bit_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 8, 16))
    pal.save(tmp_path / "pal.png", transparency=0)  # left half transparent
    Image.new("LA", (16, 16), (0, 0)).save(tmp_path / "la.png")  # fully transparent black
    Image.new("RGBA", (16, 16), (0, 0, 0, 128)).save(tmp_path / "rgba.png")  # half-transparent black
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(tmp_path / "mid.png")
    Image.new("L", (16, 16), 77).save(tmp_path / "gray.png")
    Image.new("1", (16, 16), 1).save(tmp_path / "bilevel.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")

    def px(name, xy=(12, 8)):
        im = load_rgb(tmp_path / name)
        assert im.mode == "RGB" and im.size == (16, 16)
        return im.getpixel(xy)

    r, g, b = px("cmyk.jpg")
    assert r > 200 and g < 60 and b < 60
    assert px("pal.png", (2, 2)) == (255, 255, 255) and px("pal.png") == (255, 0, 0)
    assert px("la.png") == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in px("rgba.png"))
    assert px("deep.png") == (255, 255, 255)
    assert px("mid.png") == (128, 128, 128)
    assert px("gray.png") == (77, 77, 77)
    assert px("bilevel.png") == (255, 255, 255)
    v = by_file(check_folder(tmp_path, min_side=8))
    assert all(x["status"] == "kept" for x in v.values()), v
    assert v["pal.png"]["warnings"] == ["transparency composited on white"]
    assert v["gray.png"]["warnings"] == []


def test_deep_and_float_images_are_scaled_by_bit_depth_not_brightest_pixel(tmp_path):
    dark = np.tile(np.arange(100, 220, 10, dtype=np.uint16), (12, 1))  # 100..210 of 65535: near black
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    Image.fromarray(dark.astype(np.int32)).save(tmp_path / "dark32.tif")  # opens as mode "I"
    Image.fromarray(np.full((12, 12), 0.5, np.float32)).save(tmp_path / "grey01.tif")
    Image.fromarray(np.full((12, 12), 300.0, np.float32)).save(tmp_path / "bright.tif")
    assert [Image.open(tmp_path / n).mode for n in ("dark16.png", "dark32.tif", "grey01.tif")] == ["I;16", "I", "F"]

    expected = np.round(dark / 257).astype(np.uint8)  # 65535 -> 255: 0s and 1s
    for name in ("dark16.png", "dark32.tif"):
        arr = np.asarray(load_rgb(tmp_path / name))
        assert (arr == expected[..., None]).all(), name
    assert load_rgb(tmp_path / "grey01.tif").getpixel((3, 3)) == (128, 128, 128)  # 0.5 of [0, 1]
    assert load_rgb(tmp_path / "bright.tif").getpixel((3, 3)) == (255, 255, 255)  # above 1: clipped


def test_a_16_bit_grey_png_keeps_its_transparent_value_and_lab_is_refused(tmp_path):
    """tRNS in a 16-bit grey PNG names one 16-bit value transparent: composited on white, as an
    8-bit one is. L*a*b* is refused with a reason rather than read as RGB (wrong colours)."""
    grey = np.full((12, 12), 2570, np.uint16)
    grey[:, 6:] = 40000
    Image.fromarray(grey).save(tmp_path / "key16.png", transparency=2570)
    Image.new("LAB", (12, 12), (128, 0, 0)).save(tmp_path / "lab.tif")
    assert Image.open(tmp_path / "key16.png").mode == "I;16"
    im = load_rgb(tmp_path / "key16.png")
    assert im.getpixel((2, 2)) == (255, 255, 255) and im.getpixel((9, 2)) == (156, 156, 156)  # 40000 / 257
    v = by_file(check_folder(tmp_path, min_side=8))
    assert v["key16.png"]["warnings"] == ["transparency composited on white"]
    assert v["lab.tif"]["status"] == "skipped"
    assert "cannot convert LAB image to RGB" in v["lab.tif"]["reason"] and "save the image as RGB" in v["lab.tif"]["reason"]


def test_formats_pillow_does_not_read_are_named(tmp_path):
    (tmp_path / "logo.svg").write_bytes(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>')
    (tmp_path / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64))
    (tmp_path / "page.png").write_bytes(b"<!DOCTYPE html><html>Sign in</html>")
    v = by_file(check_folder(tmp_path, min_side=8))
    assert "SVG (vector graphics)" in v["logo.svg"]["reason"]
    assert "HEIC/HEIF photo" in v["photo.heic"]["reason"]
    assert "looks like an HTML/XML page saved as '.png'" in v["page.png"]["reason"]


def swapped_srgb_profile() -> bytes:
    """A real RGB ICC profile that is not sRGB: Pillow's sRGB with the red and blue primaries swapped
    (the tag table after the 128-byte header lists signature, offset, size per tag)."""
    from PIL import ImageCms

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack(">I", data[128:132])
    entries = {bytes(data[132 + 12 * i:136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    data[red + 4:red + 12], data[blue + 4:blue + 12] = data[blue + 4:blue + 12], data[red + 4:red + 12]
    data[84:100] = bytes(16)  # profile ID (an MD5 of the rest): zero means "not computed"
    return bytes(data)


def test_embedded_icc_profile_is_converted_to_srgb(tmp_path):
    pytest.importorskip("PIL.ImageCms")
    swapped = swapped_srgb_profile()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "swapped.png", icc_profile=swapped)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "swapped.jpg", icc_profile=swapped, quality=100)
    Image.new("RGBA", (16, 16), (255, 0, 0, 255)).save(tmp_path / "swapped_rgba.png", icc_profile=swapped)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "broken.png", icc_profile=b"not a profile")

    r, g, b = load_rgb(tmp_path / "swapped.png").getpixel((8, 8))
    assert b > 200 and r < 60 and g < 60  # the file's "red" is this profile's blue
    r, g, b = load_rgb(tmp_path / "swapped.jpg").getpixel((8, 8))
    assert b > 150 and r < 80
    r, g, b = load_rgb(tmp_path / "swapped_rgba.png").getpixel((8, 8))
    assert b > 200 and r < 60  # opaque: not composited towards white
    assert load_rgb(tmp_path / "broken.png").getpixel((8, 8)) == (255, 0, 0)  # plain conversion
    v = by_file(check_folder(tmp_path, min_side=8))
    assert all(x["status"] == "kept" for x in v.values()), v
    assert v["swapped.png"]["warnings"] == [] and v["swapped_rgba.png"]["warnings"] == []
    (note,) = v["broken.png"]["warnings"]
    assert note.startswith("ICC colour profile ignored (") and "\n" not in note


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert load_rgb(tmp_path / "anim.gif").getpixel((5, 5)) == (255, 0, 0)
    (v,) = check_folder(tmp_path, min_side=8)
    assert v["status"] == "kept" and v["warnings"] == ["animated (3 frames): first frame used"]


def test_load_rgb_raises_one_line_user_error(tmp_path):
    (tmp_path / "page.jpg").write_text("<html></html>")
    with pytest.raises(BadImage) as err:
        load_rgb(tmp_path / "page.jpg")
    assert isinstance(err.value, UserError)
    assert str(err.value).startswith(f"{tmp_path / 'page.jpg'}: not an image")
    assert "\n" not in str(err.value)


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        check_folder(tmp_path / "nope", min_side=8)
