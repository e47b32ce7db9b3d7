import base64
import io

import numpy as np
import pytest
from builders import exif_rotated_jpeg
from PIL import Image

from lightning_moondream.images import (
    EncodingOptions,
    ImageError,
    displayed_size,
    encode_image,
    encode_image_with_size,
    open_image,
    prepare_image,
    to_rgb,
)


def decode(url: str) -> Image.Image:
    header, payload = url.split(",", 1)
    assert header == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def test_exif_orientation_6_is_applied_before_anything(tmp_path):
    path = tmp_path / "rot.jpg"
    image = Image.new("RGB", (80, 40), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # stored top-left corner red
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes())
    assert displayed_size(path) == (40, 80)
    shown = open_image(path)
    assert shown.size == (40, 80)
    # Orientation 6 rotates 90 degrees clockwise: the stored top-left lands top-right.
    assert shown.getpixel((35, 3))[0] > 200 and shown.getpixel((35, 3))[1] < 80
    assert shown.getpixel((3, 3))[1] > 200


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 128, (128, 128, 128)),
        ("LA", (0, 0), (255, 255, 255)),
        ("La", (0, 0), (255, 255, 255)),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),
        ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_to_rgb_modes(mode, value, expected):
    result = to_rgb(Image.new(mode, (3, 3), value))
    assert result.mode == "RGB"
    assert result.getpixel((1, 1)) == expected


def test_palette_with_transparency_composites_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    result = to_rgb(image)
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((1, 0)) == (255, 0, 0)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    array = np.array([[0, 1000, 4000]], dtype=np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(array).save(path)
    result = to_rgb(open_image(path))
    values = [result.getpixel((x, 0))[0] for x in range(3)]
    assert values[0] == 0 and values[2] == 255
    assert 60 <= values[1] <= 66  # 1000/4000 of full scale


def test_truncated_file_names_the_file(tmp_path):
    good = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(good, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg"):
        encode_image(path)


def test_size_cap_and_quality(tmp_path):
    image = Image.effect_noise((400, 200), 60).convert("RGB")
    url, size = encode_image_with_size(image, EncodingOptions(max_side=100, quality=50))
    assert size == (400, 200)
    assert decode(url).size == (100, 50)
    small = encode_image(image, EncodingOptions(max_side=100, quality=20))
    assert len(small) < len(url)
    assert prepare_image(image, EncodingOptions()).size == (400, 200)


def test_encode_with_size_reports_displayed_size_of_rotated_file(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "r.jpg", (80, 40), 6)
    url, size = encode_image_with_size(path, EncodingOptions(max_side=20))
    assert size == (40, 80)
    assert decode(url).size == (10, 20)


def test_a_large_jpeg_is_decoded_reduced_but_keeps_its_full_displayed_size(tmp_path):
    stored = Image.new("RGB", (3200, 1600), (220, 20, 20))
    stored.paste((20, 20, 220), (1600, 0, 3200, 1600))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated a quarter turn clockwise
    path = tmp_path / "big.jpg"
    stored.save(path, exif=exif.tobytes())
    url, size = encode_image_with_size(path, EncodingOptions(max_side=400))
    assert size == (1600, 3200)
    sent = decode(url).convert("RGB")
    assert sent.size == (200, 400)
    # The stored left half (red) is displayed on top, the right half (blue) below.
    assert sent.getpixel((100, 50)) == pytest.approx((220, 20, 20), abs=12)
    assert sent.getpixel((100, 350)) == pytest.approx((20, 20, 220), abs=12)
