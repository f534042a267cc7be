"""Tests for dito_fast/data/transforms.py: conversions, resize/crop/flip, image loading."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dito_fast.data.transforms import (ImageTransform, load_image, loader_resize_size, make_generator, pil_to_tensor,
                                       resize_shorter_side, tensor_to_pil, to_rgb, to_uint8)


def _random_rgb(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _smooth_rgb(h, w):
    """A non-symmetric image, so crops at different offsets and flips differ."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * y) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


# ---------------------------------------------------------------- conversions

def test_pil_to_tensor_exact_mapping():
    arr = np.array([[[0, 127, 255], [1, 128, 254]]], dtype=np.uint8)  # (1, 2, 3)
    x = pil_to_tensor(Image.fromarray(arr, "RGB"))
    assert x.shape == (3, 1, 2) and x.dtype == torch.float32 and x.is_contiguous()
    expected = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert x[0, 0, 0] == -1 and x[2, 0, 0] == 1


def test_to_uint8_roundtrip_and_layout():
    img = _random_rgb(5, 7)
    out = to_uint8(pil_to_tensor(img))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, np.asarray(img))
    batch = torch.stack([pil_to_tensor(img), pil_to_tensor(_random_rgb(5, 7, seed=1))])
    out = to_uint8(batch)
    assert out.shape == (2, 5, 7, 3)
    np.testing.assert_array_equal(out[0], np.asarray(img))


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-5.0, -1.0, 0.0, 1.0, 7.0, float("nan"), 10 / 127.5 - 1 + 0.003,
                      10 / 127.5 - 1 - 0.003]).view(1, 1, 8).expand(3, 1, 8)
    out = to_uint8(x)[0, :, 0]
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255, 0, 10, 10])  # 127.5 rounds to 128


def test_tensor_to_pil():
    img = _random_rgb(6, 4)
    back = tensor_to_pil(pil_to_tensor(img))
    assert back.mode == "RGB" and back.size == (4, 6)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(img))
    with pytest.raises(ValueError):
        tensor_to_pil(torch.zeros(1, 3, 4, 4))


def _mode_images():
    rgb = _random_rgb(20, 30)
    pal = rgb.convert("P")
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    return {
        "RGB": rgb, "L": rgb.convert("L"), "1": rgb.convert("1"), "P": pal, "P+transparency": pal_t,
        "RGBA": rgb.convert("RGBA"), "LA": rgb.convert("LA"), "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"), "I;16": Image.fromarray(np.full((20, 30), 1000, np.uint16)),
        "I": rgb.convert("I"), "F": rgb.convert("F"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_transform_any_mode_shape_dtype_range(mode):
    img = _mode_images()[mode]
    x = ImageTransform(16)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    v = np.asarray(to_rgb(img))[0, :, 0]
    np.testing.assert_array_equal(v, [0, 128, 255])  # naive convert("RGB") gives 0, 255, 255


def test_alpha_is_dropped_as_dali_does():
    # The colour channels as stored, whatever the alpha: what DALI's RGB decoding gives, so the
    # two loaders agree (compositing onto white had given white where DALI gives red).
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(to_rgb(rgba))
    assert tuple(out[1, 1]) == (255, 0, 0) and tuple(out[0, 0]) == (0, 0, 255)
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    out = np.asarray(to_rgb(pal))
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 1]) == (0, 255, 0)
    la = Image.new("LA", (1, 1), (77, 0))
    assert tuple(np.asarray(to_rgb(la))[0, 0]) == (77, 77, 77)


def test_decoder_errors_of_any_kind_name_the_file_and_process_errors_propagate(tmp_path, monkeypatch):
    import errno

    from dito_fast.data import transforms

    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    # PIL's decoders raise more than OSError/ValueError on damaged data (a fuzzed TIFF gave a
    # TypeError): any such error is the file's, reported as ValueError naming it.
    def broken(img):
        raise TypeError("'float' object cannot be interpreted as an integer")
    monkeypatch.setattr(transforms.ImageOps, "exif_transpose", broken)
    with pytest.raises(ValueError, match=r"x\.png: TypeError"):
        load_image(path)
    # out of file descriptors or memory: the process's trouble, not the file's
    for exc in (OSError(errno.EMFILE, "Too many open files"), MemoryError()):
        def fails(img, exc=exc):
            raise exc
        monkeypatch.setattr(transforms.ImageOps, "exif_transpose", fails)
        with pytest.raises(type(exc)):
            load_image(path)
    assert transforms.unreadable_file_error(OSError(errno.EIO, "I/O error"))
    assert not transforms.unreadable_file_error(KeyboardInterrupt())


# ---------------------------------------------------------------- resize / crop / flip

def test_resize_shorter_side():
    assert resize_shorter_side(_smooth_rgb(50, 100), 20).size == (40, 20)
    assert resize_shorter_side(_smooth_rgb(90, 30), 45).size == (45, 135)
    assert resize_shorter_side(_smooth_rgb(10, 10), 32).size == (32, 32)  # upsampling too
    # exact halves go up, as in the loaders (Python's round had given 384 for 769 * 256 / 512)
    assert resize_shorter_side(_smooth_rgb(512, 769), 256).size == (385, 256) == loader_resize_size(769, 512, 256)
    # an image too thin to resize whole (evaluate, fid and encode skip it as unreadable)
    with pytest.raises(ValueError, match=r"aspect ratio 65.0:1 \(130 x 2 pixels\) is beyond 64:1"):
        resize_shorter_side(_smooth_rgb(2, 130), 16)


def test_center_crop_matches_manual_pipeline():
    img = _smooth_rgb(50, 100)  # W=100, H=50 -> resized to 64 x 32, center window x in [16, 48)
    x = ImageTransform(32, crop="center")(img, generator=make_generator(1))
    manual = img.resize((64, 32), Image.Resampling.BICUBIC).crop((16, 0, 48, 32))
    torch.testing.assert_close(x, pil_to_tensor(manual), rtol=0, atol=0)


def test_random_crop_is_a_window_of_the_resized_image_and_deterministic():
    img = _smooth_rgb(40, 80)
    full = pil_to_tensor(resize_shorter_side(img, 24))  # (3, 24, 48)
    t = ImageTransform(24, crop="random")
    offsets = set()
    for seed in range(12):
        x = t(img, generator=make_generator(seed))
        torch.testing.assert_close(x, t(img, generator=make_generator(seed)), rtol=0, atol=0)
        matches = [left for left in range(full.shape[2] - 24 + 1)
                   if torch.equal(full[:, :, left:left + 24], x)]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) >= 4  # random positions, not always the same one


def test_center_crop_ignores_generator_and_flip_off():
    img = _smooth_rgb(40, 80)
    t = ImageTransform(24)
    outs = [t(img, generator=make_generator(s)) for s in range(5)]
    assert all(torch.equal(outs[0], o) for o in outs)


def test_hflip_happens_about_half_the_time():
    img = _smooth_rgb(16, 16)  # already the output size: the crop is the whole image
    base = pil_to_tensor(img)
    t = ImageTransform(16, crop="random", hflip=True)
    flips = 0
    for seed in range(40):
        x = t(img, generator=make_generator(seed))
        if torch.equal(x, base.flip(-1)):
            flips += 1
        else:
            assert torch.equal(x, base)
    assert 8 <= flips <= 32


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ImageTransform(0)
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(8, crop="corner")


def test_make_generator():
    a = torch.rand(4, generator=make_generator(0, 1, 2))
    assert torch.equal(a, torch.rand(4, generator=make_generator(0, 1, 2)))
    assert not torch.equal(a, torch.rand(4, generator=make_generator(0, 2, 1)))
    with pytest.raises(ValueError):
        make_generator(-1)


# ---------------------------------------------------------------- load_image

def _jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_load_image_ok(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGBA", (9, 5), (10, 20, 30, 255)).save(p)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (9, 5) and img.getpixel((0, 0)) == (10, 20, 30)
    q = tmp_path / "b.jpg"
    q.write_bytes(_jpeg_bytes(_smooth_rgb(32, 48)))
    assert load_image(str(q)).size == (48, 32)


def test_load_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing)
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="junk.jpg"):
        load_image(junk)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        load_image(text)
    truncated = tmp_path / "cut.jpg"
    data = _jpeg_bytes(_random_rgb(64, 64))
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.jpg"):
        load_image(truncated)
