"""One image encoder for every request: load, orient, normalize, encode as a data URL.

The client, the data layer and the local service all go through this module, so an image
is seen the same way everywhere: EXIF orientation applied first (boxes drawn on the
displayed image must match what the model sees), every PIL mode turned into RGB with
transparency composited on white, then JPEG and a base64 data URL.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Image.Image | str | os.PathLike[str] | bytes | bytearray
"""Anything that names an image: a PIL image, a path, raw encoded bytes or a data URL."""

DATA_URL_PREFIX = "data:"
ACCEPTED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp")
_FORMATS = ("JPEG", "PNG", "WEBP")
_ORIENTATION = 0x0112
"""EXIF tag of the orientation."""
_TRANSPOSED = (5, 6, 7, 8)
"""EXIF orientations that rotate by 90 degrees, so the displayed sides swap."""
DEFAULT_MAX_PIXELS = 40_000_000
"""Decoded pixel count above which an image is refused (decompression bomb guard)."""


class ImageError(ValueError):
    """An image could not be read, decoded or accepted; the message names the source."""


@dataclass(frozen=True)
class EncodingOptions:
    """How images are turned into data URLs.

    Attributes:
        max_side: Longest side in pixels after resizing; ``None`` keeps the full size.
        quality: JPEG quality, 1 to 95.
    """

    max_side: int | None = None
    quality: int = 90

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max_side must be a positive number of pixels, got {self.max_side}")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"quality must be between 1 and 95, got {self.quality}")


def is_data_url(value: object) -> bool:
    """Tell whether ``value`` is a string holding a ``data:`` URL."""
    return isinstance(value, str) and value.startswith(DATA_URL_PREFIX)


def describe_source(source: ImageInput) -> str:
    """Name an image source in error messages without dumping its bytes."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if is_data_url(source):
        return f"<data URL of {len(str(source))} characters>"
    return str(source)


def _data_url_payload(url: str) -> bytes:
    if not is_data_url(url):
        raise ImageError("image_url must be a base64 data URL (data:image/...;base64,...)")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ImageError("image_url must be a base64 data URL (data:image/...;base64,...)")
    media_type = header[len(DATA_URL_PREFIX) : -len(";base64")].lower()
    if media_type not in ACCEPTED_MEDIA_TYPES:
        raise ImageError(
            f"image_url has media type {media_type!r}; accepted: {', '.join(ACCEPTED_MEDIA_TYPES)}"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("image_url payload is not valid base64") from exc


def check_data_url(url: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Check a data URL as far as its image header, without decoding the pixels.

    Cheap enough for request validation: the scheme, media type, base64 payload, image
    format and pixel count are checked; a payload truncated after its header is only
    found by ``decode_data_url``.

    Returns:
        The image's ``(width, height)`` as stored.

    Raises:
        ImageError: If the URL is not a base64 data URL of a JPEG, PNG or WebP image
            within the pixel limit.
    """
    image = _open_bytes(
        _data_url_payload(url), "image_url", max_pixels=max_pixels, formats=_FORMATS, load=False
    )
    return image.size


def decode_data_url(url: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a base64 ``data:`` URL of a JPEG, PNG or WebP image.

    Nothing is ever fetched: any other scheme is refused.

    Args:
        url: The data URL.
        max_pixels: Refuse images whose decoded size exceeds this many pixels.

    Returns:
        The decoded image, fully loaded.

    Raises:
        ImageError: If the URL is not a base64 data URL of an accepted type, or the
            payload is not a readable image within the pixel limit.
    """
    return _open_bytes(_data_url_payload(url), "image_url", max_pixels=max_pixels, formats=_FORMATS)


def _open_bytes(
    raw: bytes,
    name: str,
    *,
    max_pixels: int,
    formats: tuple[str, ...] | None = None,
    load: bool = True,
) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(raw), formats=formats)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable image ({exc})") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: {exc}") from exc
    if image.width * image.height > max_pixels:
        raise ImageError(
            f"{name}: image of {image.width}x{image.height} pixels exceeds the limit of "
            f"{max_pixels} pixels"
        )
    return _load(image, name) if load else image


def _load(image: Image.Image, name: str, *, max_side: int | None = None) -> Image.Image:
    """Decode the pixels; a JPEG larger than ``max_side`` decodes at a reduced scale.

    JPEG decoders can skip detail at 1/2, 1/4 or 1/8 scale; the scale chosen keeps the
    image at least ``max_side`` on its longest side, so what is sent is unchanged.
    """
    try:
        if max_side is not None and image.format == "JPEG" and max(image.size) > max_side:
            scale = max_side / max(image.size)
            image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable image ({exc})") from exc
    return image


def open_image(source: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open any image source as it is displayed: EXIF orientation applied.

    Args:
        source: A PIL image, a path, raw encoded bytes or a data URL.
        max_pixels: Refuse images whose decoded size exceeds this many pixels.

    Returns:
        The image, loaded, with EXIF orientation applied, in its original mode.

    Raises:
        ImageError: If the source cannot be read or decoded; the message names it.
    """
    return _open_oriented(source, max_pixels=max_pixels)[0]


def _open_oriented(
    source: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """The image as displayed, and its displayed size at full resolution.

    With ``max_side``, a large JPEG may decode at a reduced scale (see ``_load``); the
    size returned is still that of the full image, the frame coordinates refer to.
    """
    name = describe_source(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray)):
        image = _open_bytes(bytes(source), name, max_pixels=max_pixels, load=False)
    elif is_data_url(source):
        image = _open_bytes(
            _data_url_payload(str(source)),
            "image_url",
            max_pixels=max_pixels,
            formats=_FORMATS,
            load=False,
        )
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{path}: cannot read image file ({exc.strerror or exc})") from exc
        image = _open_bytes(raw, str(path), max_pixels=max_pixels, load=False)
    else:
        raise ImageError(
            f"unsupported image type {type(source).__name__}; "
            "give a PIL image, a path, bytes or a data URL"
        )
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{name}: cannot read EXIF orientation ({exc})") from exc
    width, height = image.size
    size = (height, width) if orientation in _TRANSPOSED else (width, height)
    image = _load(image, name, max_side=max_side)
    try:
        return (ImageOps.exif_transpose(image) or image), size
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{name}: cannot apply EXIF orientation ({exc})") from exc


def displayed_size(source: ImageInput) -> tuple[int, int]:
    """Return ``(width, height)`` of an image as displayed (after EXIF orientation).

    Reads only the header of a file where possible, so pixel boxes can be normalized
    without decoding the whole image.
    """
    if isinstance(source, (str, os.PathLike)) and not is_data_url(source):
        try:
            with Image.open(source) as image:
                width, height = image.size
                orientation = image.getexif().get(_ORIENTATION, 1)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{source}: not a readable image ({exc})") from exc
        return (height, width) if orientation in _TRANSPOSED else (width, height)
    return open_image(source).size


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency on white.

    Handles L, LA, P (with or without transparency), RGBA, CMYK, I;16 and other 16-bit
    or float modes.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Scale high bit depths to 8 bits instead of clipping them to white.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) if array.size else 0.0
        scale = 255.0 / peak if peak > 255.0 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype("uint8"), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        # Premultiplied "La" has no direct path to RGBA; un-premultiply through LA first.
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def prepare_image(source: ImageInput, options: EncodingOptions | None = None) -> Image.Image:
    """Open, orient, convert to RGB and resize an image the way it will be sent."""
    options = options or EncodingOptions()
    image, _ = _open_oriented(source, max_side=options.max_side)
    return _resize(to_rgb(image), options)


def _resize(image: Image.Image, options: EncodingOptions) -> Image.Image:
    if options.max_side is not None and max(image.size) > options.max_side:
        scale = options.max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image


def _jpeg_data_url(image: Image.Image, quality: int) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_image(source: ImageInput, options: EncodingOptions | None = None) -> str:
    """Encode an image as the ``data:image/jpeg;base64,...`` URL the API expects.

    A data URL is returned unchanged: it is already encoded, and encoding it again would
    only lose quality.

    Args:
        source: A PIL image, a path, raw encoded bytes or a data URL.
        options: Size cap and JPEG quality.

    Returns:
        The data URL.

    Raises:
        ImageError: If the source cannot be read or decoded; the message names it.
    """
    if is_data_url(source):
        return str(source)
    options = options or EncodingOptions()
    return _jpeg_data_url(prepare_image(source, options), options.quality)


def encode_image_with_size(
    source: ImageInput, options: EncodingOptions | None = None
) -> tuple[str, tuple[int, int]]:
    """Encode an image like :func:`encode_image` and report its displayed size.

    The size is the ``(width, height)`` of the image after EXIF orientation and before
    any resizing: the frame that normalized coordinates refer to, and that pixel metrics
    scale them back to. Decoding happens once for both.

    Args:
        source: A PIL image, a path, raw encoded bytes or a data URL.
        options: Size cap and JPEG quality.

    Returns:
        The data URL and the displayed ``(width, height)``.

    Raises:
        ImageError: If the source cannot be read or decoded; the message names it.
    """
    options = options or EncodingOptions()
    if is_data_url(source):
        return str(source), _open_oriented(source)[1]
    image, size = _open_oriented(source, max_side=options.max_side)
    return _jpeg_data_url(_resize(to_rgb(image), options), options.quality), size
