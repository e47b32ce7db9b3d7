"""Image encoding for samples: a bounded cache of data URLs and a count of bytes sent.

Encoding (decode, orient, resize, JPEG, base64) is the costly part of preparing a
request, and one image is often reused by many prompts (one per class present) and by
every epoch. :class:`EncodedImageCache` keeps recent data URLs, least recently used
first out, bounded both in bytes and in entries. Files are keyed by path, modification
time and size, so an edited file is encoded afresh; raw bytes and data URLs are keyed by
a digest of their content; PIL images have no stable identity and are never cached.

Each DataLoader worker holds its own cache (see :class:`EncodedDataset`), so the
memory bound applies per worker process.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from lightning_moondream.images import (
    EncodingOptions,
    ImageInput,
    encode_image_with_size,
    is_data_url,
)

DEFAULT_MAX_SIDE = 768
"""Longest side sent by default: Moondream works on crops of a few hundred pixels, so
larger images only cost bandwidth."""
DEFAULT_QUALITY = 90
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
DEFAULT_CACHE_ITEMS = 4096


@dataclass
class EncodingStats:
    """Counters of one cache.

    Attributes:
        encoded: Images encoded (cache misses).
        hits: Images served from the cache.
        bytes_out: Characters of data URLs handed out, hits included: the image bytes
            that requests built from them will send.
    """

    encoded: int = 0
    hits: int = 0
    bytes_out: int = 0


class EncodedImageCache:
    """A least-recently-used cache of encoded images, bounded in bytes and entries.

    Args:
        max_bytes: Largest total size of cached data URLs; ``0`` disables caching.
        max_items: Largest number of cached images.
    """

    def __init__(
        self, max_bytes: int = DEFAULT_CACHE_BYTES, max_items: int = DEFAULT_CACHE_ITEMS
    ) -> None:
        if max_bytes < 0 or max_items < 0:
            raise ValueError("cache bounds must not be negative")
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.stats = EncodingStats()
        self._entries: OrderedDict[Hashable, tuple[str, tuple[int, int]]] = OrderedDict()
        self._size = 0
        # DataLoader workers are processes, but users may share a cache across threads.
        self._lock = threading.Lock()

    @property
    def cached_bytes(self) -> int:
        """Total size of the data URLs held."""
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self, image: ImageInput, options: EncodingOptions) -> tuple[str, tuple[int, int]]:
        """Encode an image, or return its cached encoding.

        Args:
            image: A path, bytes, a data URL or a PIL image.
            options: Size cap and JPEG quality; part of the cache key.

        Returns:
            The data URL and the displayed ``(width, height)`` before resizing.

        Raises:
            ImageError: If the image cannot be read; the message names it.
        """
        key = _cache_key(image, options)
        if key is not None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    self.stats.bytes_out += len(entry[0])
                    return entry
        entry = encode_image_with_size(image, options)
        with self._lock:
            self.stats.encoded += 1
            self.stats.bytes_out += len(entry[0])
            if key is not None:
                self._store(key, entry)
        return entry

    def _store(self, key: Hashable, entry: tuple[str, tuple[int, int]]) -> None:
        size = len(entry[0])
        if size > self.max_bytes or self.max_items == 0:
            return
        self._entries[key] = entry
        self._size += size
        while self._size > self.max_bytes or len(self._entries) > self.max_items:
            _, (url, _) = self._entries.popitem(last=False)
            self._size -= len(url)

    def summary(self) -> dict[str, int]:
        """Return the counters and occupancy as a plain dict, for logging."""
        return {
            "encoded": self.stats.encoded,
            "hits": self.stats.hits,
            "bytes_out": self.stats.bytes_out,
            "cached_images": len(self),
            "cached_bytes": self.cached_bytes,
        }

    def clear(self) -> None:
        """Drop every cached image (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self._size = 0


def _cache_key(image: ImageInput, options: EncodingOptions) -> Hashable | None:
    if isinstance(image, Image.Image):
        return None
    if isinstance(image, (bytes, bytearray)):
        return ("bytes", hashlib.blake2b(bytes(image), digest_size=16).digest(), options)
    if is_data_url(image):
        digest = hashlib.blake2b(str(image).encode("ascii", "replace"), digest_size=16).digest()
        return ("data", digest, options)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            stat = path.stat()
        except OSError:
            # Let the encoder raise its error naming the file.
            return None
        return ("file", str(path.resolve()), stat.st_mtime_ns, stat.st_size, options)
    return None


class EncodedDataset(Dataset):
    """Wrap a dataset of samples so that ``__getitem__`` returns them encoded.

    Indexing runs in DataLoader workers, so this is where images are decoded, resized
    and turned into data URLs, outside the training loop. Each process builds its own
    cache on first use; the cache is not pickled to workers.

    Args:
        dataset: A map-style dataset of samples.
        options: Size cap and JPEG quality.
        cache_bytes: Bound of each process's cache, in bytes; ``0`` disables it.
        cache_items: Bound of each process's cache, in images.
    """

    def __init__(
        self,
        dataset: Dataset,
        options: EncodingOptions,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        cache_items: int = DEFAULT_CACHE_ITEMS,
    ) -> None:
        self.dataset = dataset
        self.options = options
        self.cache_bytes = cache_bytes
        self.cache_items = cache_items
        self._cache: EncodedImageCache | None = None

    @property
    def cache(self) -> EncodedImageCache:
        """This process's cache."""
        if self._cache is None:
            self._cache = EncodedImageCache(self.cache_bytes, self.cache_items)
        return self._cache

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index].encoded(self.options, self.cache)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state
