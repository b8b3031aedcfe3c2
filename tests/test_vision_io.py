import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from lineside.vision.io import ImageReadError, read_image


def test_grayscale_and_rgb_channels(tmp_path):
    g = write_image(tmp_path / "g.png", size=(30, 20), mode="L")
    c = write_image(tmp_path / "c.png", size=(30, 20), mode="RGB")
    assert read_image(g, 1).shape == (20, 30, 1)
    assert read_image(g, 3).shape == (20, 30, 3)
    rgb = read_image(c, 3)
    gray = read_image(c, 1)
    assert rgb.dtype == np.uint8 and gray.shape == (20, 30, 1)
    assert np.array_equal(read_image(g, 3)[..., 0], read_image(g, 3)[..., 2])


def test_16_bit_images_are_scaled_to_uint8(tmp_path):
    a = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    p = tmp_path / "el16.png"
    Image.fromarray(a).save(p)
    out = read_image(p, 1)
    assert out.dtype == np.uint8
    assert out.max() > 200 and out.min() == 0


@pytest.mark.parametrize(
    "name,content,reason",
    [("corrupt.png", b"not an image at all", "corrupt"), ("empty.png", b"", "empty"), ("notes.txt", b"hello", "unsupported")],
)
def test_bad_files_name_the_file_and_reason(tmp_path, name, content, reason):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ImageReadError) as err:
        read_image(p)
    assert str(p) in str(err.value) and reason in str(err.value)


def test_truncated_png(tmp_path):
    p = write_image(tmp_path / "t.png", size=(200, 200))
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(ImageReadError, match="t.png"):
        read_image(p)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.png")
