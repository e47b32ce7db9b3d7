"""Auto-labelling: a model's boxes or points for every image of a folder, resumable.

Each image is asked once per class. Its answers are appended to ``predictions.jsonl``
in the output folder as soon as the image is done, so a run that stops (an error, a
rate limit, Ctrl-C) loses nothing: run it again with the same output folder and it asks
only for the images not yet done. At the end the labels are written in every format
asked for (see :mod:`~lightning_moondream.labelling.formats`).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning_moondream.api.models import Box, Point
from lightning_moondream.data.records import AnnotatedImage
from lightning_moondream.data.sources.files import header_size, image_files
from lightning_moondream.images import EncodingOptions, encode_image
from lightning_moondream.labelling.formats import LABEL_FORMATS, write_labels

PROGRESS_FILE = "predictions.jsonl"
"""The output folder's record of every image done, one JSON line each."""

DEFAULT_ENCODING = EncodingOptions(max_side=768)

Answer = Callable[[str, str], Awaitable[Sequence[Box] | Sequence[Point]]]
"""Answers one request: ``(image as a data URL, object name)`` -> boxes or points."""

LabelSkill = Literal["detect", "point"]


class LabellingError(RuntimeError):
    """Labelling cannot go on as asked; what is done so far is kept."""


@dataclass(frozen=True)
class LabellingRun:
    """What a labelling run did.

    Attributes:
        output: The output folder.
        files: Per format, the file a reader starts from.
        labelled: Images answered by this run.
        resumed: Images taken from an earlier run's ``predictions.jsonl``.
    """

    output: Path
    files: dict[str, Path]
    labelled: int
    resumed: int


def label_images(
    images: str | Path | Sequence[str | Path],
    classes: Sequence[str],
    answer: Answer,
    output: str | Path,
    **options: Any,
) -> LabellingRun:
    """Label images with a model, from synchronous code (see :func:`label_images_async`)."""
    return asyncio.run(label_images_async(images, classes, answer, output, **options))


async def label_images_async(
    images: str | Path | Sequence[str | Path],
    classes: Sequence[str],
    answer: Answer,
    output: str | Path,
    *,
    model_version: str,
    skill: LabelSkill = "detect",
    formats: Sequence[str] = ("coco",),
    max_concurrency: int = 8,
    encoding: EncodingOptions = DEFAULT_ENCODING,
    progress: Callable[[int, int], None] | None = None,
) -> LabellingRun:
    """Ask ``answer`` for every class on every image and write the labels.

    Args:
        images: A folder (every image under it) or a list of image files.
        classes: Object names to ask for; each becomes the label of what it finds.
        answer: The model: ``await answer(data_url, object)`` -> boxes (detect) or points.
        output: Folder of ``predictions.jsonl`` and one subfolder per format.
        model_version: The model's id, recorded with the labels.
        skill: ``detect`` (boxes) or ``point`` (points).
        formats: Any of ``coco``, ``yolo``, ``labelstudio``.
        max_concurrency: Requests in flight at once.
        encoding: How images are encoded for the model.
        progress: Called with ``(images done, images in all)`` after each image.

    Returns:
        What was written, and how many images this run answered.

    Raises:
        LabellingError: If the output folder holds another run's labels, or an image
            could not be answered (the images done so far are kept).
        ValueError: For an empty class list, an unknown format, or points in a format
            without them.
    """
    _check_options(classes, formats, skill)
    files = _image_list(images)
    root = Path(output)
    record = _Progress(root / PROGRESS_FILE, model=model_version, skill=skill, classes=classes)
    labelling = _Labelling(files, record, _Asker(answer, classes, max_concurrency, encoding))
    answered = await labelling.run(progress)
    labelled = [
        _annotated(path, image_id, labelling.done[image_id], skill)
        for image_id, path in files.items()
    ]
    written = {
        name: write_labels(labelled, classes, root / name, name, model_version=model_version)
        for name in formats
    }
    return LabellingRun(root, written, labelled=answered, resumed=len(files) - answered)


def _check_options(classes: Sequence[str], formats: Sequence[str], skill: LabelSkill) -> None:
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct object names, got {list(classes)!r}")
    unknown = [name for name in formats if name not in LABEL_FORMATS]
    if unknown or (skill == "point" and set(formats) - {"labelstudio"}):
        raise ValueError(
            f"formats must be from {', '.join(LABEL_FORMATS)} (points: labelstudio only), "
            f"got {list(formats)!r}"
        )


class _Asker:
    """Asks the model for every class on an image, a bounded number of requests at once."""

    def __init__(
        self,
        answer: Answer,
        classes: Sequence[str],
        max_concurrency: int,
        encoding: EncodingOptions,
    ) -> None:
        self._answer = answer
        self._classes = classes
        self._encoding = encoding
        self._requests = asyncio.Semaphore(max_concurrency)
        # Bounds the encoded images held at once, however many images there are.
        self._open_images = asyncio.Semaphore(max_concurrency)

    async def objects(self, path: Path) -> dict[str, list[list[float]]]:
        """What the model found of each class on an image, as coordinates."""
        async with self._open_images:
            data_url = await asyncio.to_thread(encode_image, path, self._encoding)
            answers = await asyncio.gather(*(self._ask(data_url, name) for name in self._classes))
        return dict(zip(self._classes, answers, strict=True))

    async def _ask(self, data_url: str, name: str) -> list[list[float]]:
        async with self._requests:
            found = await self._answer(data_url, name)
        return [_coordinates(item) for item in found]


class _Labelling:
    """One run over the images: those not done yet are asked and recorded as they finish.

    Args:
        files: Every image of the run, by id.
        record: The output folder's record; what it holds already is not asked again.
        asker: Asks the model about one image.
    """

    def __init__(self, files: dict[str, Path], record: _Progress, asker: _Asker) -> None:
        self._files = files
        self._record = record
        self._asker = asker
        self.done = record.load()
        """The entry of every image done, by id."""

    async def run(self, progress: Callable[[int, int], None] | None) -> int:
        """Label every image not done yet; return how many this run answered."""
        todo = [
            (image_id, path) for image_id, path in self._files.items() if image_id not in self.done
        ]
        await _run_all(self._label(image_id, path, progress) for image_id, path in todo)
        return len(todo)

    async def _label(
        self, image_id: str, path: Path, progress: Callable[[int, int], None] | None
    ) -> None:
        try:
            objects = await self._asker.objects(path)
        except Exception as exc:
            raise LabellingError(
                f"{path}: the model could not answer ({exc}); {len(self.done)} of "
                f"{len(self._files)} images are done and kept in {self._record.path}: run "
                "again to go on"
            ) from exc
        size = header_size(path, str(path))
        self.done[image_id] = self._record.append(image_id, size, objects)
        if progress is not None:
            progress(len(self.done), len(self._files))


async def _run_all(jobs: Iterable[Awaitable[None]]) -> None:
    """Run every job; on a failure, cancel the rest and raise the first error."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _image_list(images: str | Path | Sequence[str | Path]) -> dict[str, Path]:
    """Images by id: their path relative to the folder (or the files' common folder)."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise LabellingError(f"{folder}: not a folder of images")
        paths = image_files(folder)
    else:
        paths = [Path(image) for image in images]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise LabellingError(f"no such image file: {', '.join(missing[:5])}")
        parents = [str(path.resolve().parent) for path in paths] or ["."]
        folder = Path(os.path.commonpath(parents))
    if not paths:
        raise LabellingError(f"{images}: no images to label")
    return {path.resolve().relative_to(folder.resolve()).as_posix(): path for path in paths}


def _coordinates(item: Box | Point) -> list[float]:
    if isinstance(item, Box):
        return list(item.as_tuple())
    return [item.x, item.y]


def _annotated(path: Path, image_id: str, line: dict[str, Any], skill: str) -> AnnotatedImage:
    pairs = [(name, found) for name, items in line["objects"].items() for found in items]
    labels = tuple(name for name, _ in pairs)
    if skill == "point":
        points = tuple(Point(x=x, y=y) for _, (x, y) in pairs)
        return AnnotatedImage(
            path, (), (), image_id, tuple(line["size"]), points=points, point_labels=labels
        )
    boxes = tuple(Box(x_min=a, y_min=b, x_max=c, y_max=d) for _, (a, b, c, d) in pairs)
    return AnnotatedImage(path, boxes, labels, image_id, tuple(line["size"]))


class _Progress:
    """``predictions.jsonl``: a header line naming the run, then one line per image."""

    def __init__(self, path: Path, *, model: str, skill: str, classes: Sequence[str]) -> None:
        self.path = path
        self.header = {"model": model, "skill": skill, "classes": list(classes)}

    def load(self) -> dict[str, dict[str, Any]]:
        """The images an earlier run finished, after checking it is the same run.

        A line a crash cut short or garbled is dropped from the file (its image is asked
        again); every other finished image is kept.
        """
        text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        if not text.strip():
            # New, or created by a run that stopped before writing its header.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.header) + "\n", encoding="utf-8")
            return {}
        lines = text.splitlines(keepends=True)
        header = _entry(lines[0])
        if header != self.header:
            raise LabellingError(
                f"{self.path} holds labels of another run ({header}); labelling now asks "
                f"{self.header}: choose another output folder or remove it"
            )
        done: dict[str, dict[str, Any]] = {}
        kept = [lines[0]]
        for line in lines[1:]:
            entry = _entry(line) if line.endswith("\n") else None
            if entry is not None and isinstance(entry.get("id"), str):
                done[entry["id"]] = entry
                kept.append(line)
        if len(kept) < len(lines):
            self.path.write_text("".join(kept), encoding="utf-8")
        return done

    def append(
        self, image_id: str, size: tuple[int, int], objects: dict[str, list[list[float]]]
    ) -> dict[str, Any]:
        """Record one finished image (flushed at once) and return its entry."""
        entry = {"id": image_id, "size": list(size), "objects": objects}
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")
        return entry


def _entry(line: str) -> dict[str, Any] | None:
    """A line of ``predictions.jsonl`` as a JSON object, or ``None`` if it is not one."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
