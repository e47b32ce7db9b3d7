import pickle

import pytest
from builders import exif_rotated_jpeg, save_image
from PIL import Image

from lightning_moondream.api.models import Box, DetectRequest, Point, PointGroundTruth, Settings
from lightning_moondream.data import (
    DatasetError,
    DatasetWarning,
    DetectSample,
    EncodedImageCache,
    PointSample,
    QuerySample,
)
from lightning_moondream.images import EncodingOptions


def test_from_pixels_on_exif_rotated_image_normalizes_by_displayed_size(tmp_path):
    # Stored 80x40 with orientation 6: displayed 40 wide, 80 tall.
    path = exif_rotated_jpeg(tmp_path / "r.jpg", (80, 40), 6)
    sample = DetectSample.from_pixels(path, "cup", [(10, 20, 30, 60)])
    assert sample.image_size == (40, 80)
    assert sample.boxes == (Box(x_min=0.25, y_min=0.25, x_max=0.75, y_max=0.75),)
    point = PointSample.from_pixels(path, "cup", pixel_points=[(10, 60)])
    assert point.points == (Point(x=0.25, y=0.75),)


def test_box_outside_is_clamped_with_warning_naming_source(tmp_path):
    with pytest.warns(DatasetWarning, match=r"ann\.json 'cup' box 0: .*outside the 100x50 image"):
        sample = DetectSample.from_pixels(
            "x.jpg", "cup", [(-10, 10, 50, 60)], (100, 50), source="ann.json"
        )
    assert sample.boxes == (Box(x_min=0.0, y_min=0.2, x_max=0.5, y_max=1.0),)
    with pytest.raises(DatasetError, match=r"ann\.json 'cup' box 0"):
        DetectSample.from_pixels(
            "x.jpg", "cup", [(-10, 10, 50, 60)], (100, 50), strict=True, source="ann.json"
        )


def test_zero_area_box_dropped_or_refused():
    with pytest.warns(DatasetWarning, match=r"a\.xml 'cup' box 1: .*zero area"):
        sample = DetectSample.from_pixels(
            "x.jpg", "cup", [(1, 1, 5, 5), (5, 5, 5, 9)], (10, 10), source="a.xml"
        )
    assert len(sample.boxes) == 1
    with pytest.raises(DatasetError, match=r"zero area"):
        DetectSample.from_pixels(
            "x.jpg", "cup", [(5, 5, 5, 9)], (10, 10), strict=True, source="a.xml"
        )
    with pytest.raises(DatasetError, match=r"not finite"):
        DetectSample.from_pixels("x.jpg", "cup", [(0, 0, float("nan"), 9)], (10, 10))


def test_requests_ground_truth_and_targets(tmp_path):
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    detect = DetectSample(
        image, "dog", (Box(x_min=0.1, y_min=0.2, x_max=0.3, y_max=0.4),)
    ).encoded()
    request = detect.to_request(Settings(max_objects=3))
    assert isinstance(request, DetectRequest)
    assert request.image_url == detect.image and request.settings.max_objects == 3
    assert detect.ground_truth().boxes[0].x_max == 0.3
    assert detect.target() == {"boxes": [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}]}
    assert detect.label == "dog" and detect.skill == "detect"
    point = PointSample(image, "dog", boxes=()).encoded()
    assert point.ground_truth() == PointGroundTruth(boxes=[])
    assert point.target() == {"boxes": []}
    query = QuerySample(None, "What?", ("a", "b"))
    assert query.encoded() is query
    assert query.to_request().to_json() == {"skill": "query", "question": "What?"}
    assert query.ground_truth() is None and query.target() == {"answers": ["a", "b"]}
    with pytest.raises(ValueError, match=r"exactly one"):
        PointSample(image, "dog")


def test_encoded_sets_size_bytes_and_uses_cache(tmp_path):
    path = save_image(tmp_path / "p.jpg", (300, 150))
    cache = EncodedImageCache()
    options = EncodingOptions(max_side=60)
    first = DetectSample(str(path), "a", ()).encoded(options, cache)
    second = PointSample(str(path), "b", points=()).encoded(options, cache)
    assert first.image.startswith("data:image/jpeg;base64,")
    assert first.image_size == (300, 150)
    assert first.image_bytes == len(first.image) and first.image_bytes > 0
    assert second.image == first.image
    assert (cache.stats.encoded, cache.stats.hits) == (1, 1)
    assert cache.stats.bytes_out == 2 * len(first.image)
    DetectSample(str(path), "a", ()).encoded(EncodingOptions(max_side=30), cache)
    assert cache.stats.encoded == 2  # options are part of the key
    restored = pickle.loads(pickle.dumps(first))
    assert restored == first


def test_cache_is_bounded_and_keyed_by_mtime(tmp_path):
    paths = [save_image(tmp_path / f"{i}.png", (20, 20), (i * 40, 0, 0)) for i in range(4)]
    options = EncodingOptions()
    one, _ = EncodedImageCache().encode(paths[0], options)
    cache = EncodedImageCache(max_bytes=len(one) * 2 + 10, max_items=100)
    for path in paths:
        cache.encode(path, options)
    assert len(cache) == 2 and cache.cached_bytes <= cache.max_bytes
    cache.encode(paths[3], options)
    assert cache.stats.hits == 1
    save_image(paths[3], (20, 20), (0, 255, 0))
    import os

    os.utime(paths[3], ns=(10**18, 10**18))
    cache.encode(paths[3], options)
    assert cache.stats.hits == 1 and cache.stats.encoded == 5
    counted = EncodedImageCache(max_items=1)
    counted.encode(paths[0], options)
    counted.encode(paths[1], options)
    assert len(counted) == 1


def test_bad_image_in_encoding_raises_dataset_error_naming_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"broken\.jpg.*sample 'broken#x'"):
        DetectSample(str(path), "x", (), id="broken#x").encoded()
    with pytest.raises(DatasetError, match=r"missing\.jpg"):
        DetectSample.from_pixels(tmp_path / "missing.jpg", "x", [(0, 0, 1, 1)])


def test_size_mismatch_warns_at_encoding(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "r.jpg", (80, 40), 6)
    with pytest.warns(DatasetWarning, match=r"annotated as 80x40 but displayed as 40x80"):
        DetectSample(str(path), "x", (), image_size=(80, 40)).encoded()
