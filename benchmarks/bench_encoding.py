"""Encoding throughput and request size: our encoder (default cap) vs full-size JPEG q95.

Images are generated in-process (smooth gradients plus noise, like a photo) at 640 px and
4000 px on the long side. Prints a table and writes ``benchmarks/results/encoding.json``.

Run: ``python benchmarks/bench_encoding.py [--repeats N]``
"""

from __future__ import annotations

import argparse
import base64
import io
import time

import numpy as np
from common import write_results
from PIL import Image

from lightning_moondream.data.encoding import DEFAULT_MAX_SIDE, DEFAULT_QUALITY
from lightning_moondream.images import EncodingOptions, encode_image


def photo_like(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG file of gradients, blobs and noise, as a camera would store it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy = rng.uniform(1, 6, 2).tolist()
        phase = rng.uniform(0, 6.28)
        wave = np.sin(x / width * fx * 6.28 + phase) * np.cos(y / height * fy * 6.28)
        channels.append(128 + 80 * wave + rng.normal(0, 12, (height, width)))
    array = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def plain_q95(raw: bytes) -> str:
    """The naive baseline: decode, re-encode at full size, quality 95."""
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def measure(encode, raw: bytes, repeats: int) -> dict[str, float]:
    url = encode(raw)
    start = time.perf_counter()
    for _ in range(repeats):
        encode(raw)
    elapsed = time.perf_counter() - start
    return {"images_per_s": repeats / elapsed, "bytes_per_request": len(url)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    options = EncodingOptions(max_side=DEFAULT_MAX_SIDE, quality=DEFAULT_QUALITY)
    rows = []
    for name, size in (("640px", (640, 427)), ("4000px", (4000, 3000))):
        raw = photo_like(*size)
        ours = measure(lambda data: encode_image(data, options), raw, args.repeats)
        baseline = measure(plain_q95, raw, args.repeats)
        rows.append(
            {
                "image": name,
                "size": list(size),
                "ours": ours,
                "full_q95": baseline,
                "speedup": ours["images_per_s"] / baseline["images_per_s"],
                "bytes_ratio": ours["bytes_per_request"] / baseline["bytes_per_request"],
            }
        )
    print(
        f"encoder: max_side={options.max_side}, quality={options.quality}; baseline: full size, q95"
    )
    print(
        f"{'image':8} {'ours img/s':>11} {'q95 img/s':>10} {'speedup':>8} {'ours KB':>9} {'q95 KB':>9} {'bytes':>7}"
    )
    for row in rows:
        print(
            f"{row['image']:8} {row['ours']['images_per_s']:11.1f} {row['full_q95']['images_per_s']:10.1f} "
            f"{row['speedup']:7.2f}x {row['ours']['bytes_per_request'] / 1024:9.1f} "
            f"{row['full_q95']['bytes_per_request'] / 1024:9.1f} {row['bytes_ratio']:7.3f}"
        )
    payload = {
        "max_side": options.max_side,
        "quality": options.quality,
        "repeats": args.repeats,
        "results": rows,
    }
    print(f"wrote {write_results('encoding', payload)}")


if __name__ == "__main__":
    main()
