"""``lightning-moondream label``: a model's boxes or points for a folder or a dataset's images.

The model is named as ``evaluate`` names it (``base``, ``FT@STEP``,
``moondream3-preview/FT@STEP``, an adapter, ``ADAPTER/chk_xxx``, a Lightning ``.ckpt``):
the base model and ``/finetunes`` checkpoints answer through the inference API, adapters
and ``/adapters`` checkpoints through rollouts at temperature 0. The labels are written
by :func:`~lightning_moondream.labelling.label_images_async` (resumable) in each format
asked for.

Example:
    Label a dataset's images with a checkpoint, for its own classes::

        lightning-moondream label --model 01jq0v3b@40 --data /data/raccoon --data-format voc
            --format coco,labelstudio --output runs/labels
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lightning_moondream.api import (
    AsyncTuningClient,
    Box,
    DetectRequest,
    Point,
    PointRequest,
    Settings,
    TuningAPIError,
)
from lightning_moondream.api.inference import AsyncInferenceClient
from lightning_moondream.data.detect import FORMATS, Records, read_records
from lightning_moondream.data.errors import DatasetError
from lightning_moondream.evaluation import (
    MODEL_FORMS,
    EvaluationError,
    ModelSpec,
    OpenedModel,
    add_service_options,
    connect,
    open_model,
)
from lightning_moondream.labelling.formats import LABEL_FORMATS
from lightning_moondream.labelling.run import (
    Answer,
    LabellingError,
    LabellingRun,
    LabelSkill,
    label_images_async,
)

GREEDY = Settings(temperature=0.0)


@dataclass(frozen=True)
class LabellingInput:
    """What to label: the images and the classes asked for on each.

    Attributes:
        images: A folder, or the image files of a dataset.
        classes: The object names to ask for.
    """

    images: str | list[str]
    classes: list[str]


def labelling_input(
    images: str | None,
    data: str | None,
    data_format: str | None,
    classes: Sequence[str],
    split: str | None = None,
) -> LabellingInput:
    """The images of ``--images`` or of a split of ``--data``, and the classes.

    The classes are the dataset's unless given; the split is the one named, else the
    dataset's training split, else its only one.

    Raises:
        LabellingError: If neither or both are given, or no class is known.
        DatasetError: If the dataset cannot be read.
    """
    if (images is None) == (data is None):
        raise LabellingError("give --images FOLDER or --data DATASET (one of them)")
    if images is not None:
        if not classes:
            raise LabellingError("--classes is needed with --images (e.g. --classes cat,dog)")
        if split is not None:
            raise LabellingError("--split chooses a split of --data, not of --images")
        return LabellingInput(images, list(classes))
    assert data is not None
    records = read_records(data, format=data_format, split=split)
    if not isinstance(records, Records):
        raise LabellingError(f"{data}: not a dataset of annotated images (boxes or points)")
    files = [str(image.image) for image in records.images if isinstance(image.image, (str, Path))]
    if len(files) < len(records.images):
        raise LabellingError(
            f"{data}: {len(records.images) - len(files)} of {len(records.images)} images are "
            "not files (e.g. kept inside a Hugging Face dataset); labelling writes files "
            "beside images: save them to a folder and pass --images"
        )
    return LabellingInput(files, list(classes) or list(records.classes))


def model_answer(
    opened: OpenedModel,
    client: AsyncTuningClient,
    inference: AsyncInferenceClient,
    skill: LabelSkill,
) -> Answer:
    """Ask the model for one object on one image, greedily.

    The base model and finetune checkpoints answer through the inference API; an
    adapter (or an adapter made from an ``/adapters`` checkpoint) through one rollout
    at temperature 0.
    """
    model = opened.model_id

    async def by_inference(image: str, name: str) -> Sequence[Box] | Sequence[Point]:
        if skill == "point":
            return (await inference.point(image, name, model=model, settings=GREEDY)).points
        return (await inference.detect(image, name, model=model, settings=GREEDY)).objects

    async def by_rollout(image: str, name: str) -> Sequence[Box] | Sequence[Point]:
        fields = {"image_url": image, "object": name, "settings": GREEDY}
        if skill == "point":
            response = await client.rollouts(model, PointRequest.model_validate(fields), 1)
            return response.rollouts[0].points
        response = await client.rollouts(model, DetectRequest.model_validate(fields), 1)
        return response.rollouts[0].boxes

    return by_inference if opened.spec.path == "inference" else by_rollout


async def label_with_model(
    client: AsyncTuningClient,
    model: str,
    what: LabellingInput,
    output: str | Path,
    *,
    skill: LabelSkill = "detect",
    formats: Sequence[str] = ("coco",),
    max_concurrency: int = 8,
    progress: bool = True,
) -> LabellingRun:
    """Label images with a model named as ``evaluate`` names one, through ``client``'s service.

    An adapter made from an ``/adapters`` checkpoint is deleted at the end.

    Raises:
        EvaluationError: If the model does not exist (naming what does).
        LabellingError: If labelling cannot go on (what is done is kept).
    """
    # Made first: a service it cannot reach must not leave an adapter behind.
    inference = AsyncInferenceClient.for_tuning(client)
    opened = await open_model(client, ModelSpec.parse(model))
    try:
        with tqdm(unit="image", disable=not progress, desc=f"labelling with {model}") as bar:

            def advance(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            return await label_images_async(
                what.images,
                what.classes,
                model_answer(opened, client, inference, skill),
                output,
                model_version=opened.shown_id,
                skill=skill,
                formats=formats,
                max_concurrency=max_concurrency,
                progress=advance,
            )
    finally:
        try:
            if opened.created:
                await client.adapters.delete(opened.model_id)
        finally:
            await inference.close()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-moondream label``."""
    parser = argparse.ArgumentParser(
        prog="lightning-moondream label",
        description="Label images with a model's detections or points, written as COCO, "
        "YOLO or Label Studio pre-annotations. A stopped run resumes in the same --output. "
        "The API key comes from MOONDREAM_API_KEY; with neither a key nor --base-url, the "
        "local tuning service runs in this process.",
    )
    parser.add_argument("--model", required=True, help=MODEL_FORMS)
    parser.add_argument("--images", default=None, help="a folder of images to label")
    parser.add_argument(
        "--data", default=None, help="a dataset whose images are labelled (its classes by default)"
    )
    parser.add_argument(
        "--data-format", choices=FORMATS, default=None, help="the --data dataset's format"
    )
    parser.add_argument(
        "--split",
        default=None,
        help="the --data split to label (default: its training split, else its only one)",
    )
    parser.add_argument(
        "--classes", default="", help="comma-separated object names, e.g. 'cat,dog'"
    )
    parser.add_argument("--skill", choices=("detect", "point"), default="detect")
    parser.add_argument(
        "--format",
        default="coco",
        help=f"comma-separated output formats from {', '.join(LABEL_FORMATS)} (points: "
        "labelstudio only)",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--max-concurrency", type=int, default=8, help="requests in flight")
    add_service_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


async def _run(args: argparse.Namespace, what: LabellingInput) -> LabellingRun:
    client = connect(args.local_dir, args.base_url)
    try:
        return await label_with_model(
            client,
            args.model,
            what,
            args.output,
            skill=args.skill,
            formats=_split(args.format),
            max_concurrency=args.max_concurrency,
            progress=not args.no_progress,
        )
    finally:
        await client.close()


def label_main(argv: Sequence[str]) -> int:
    """``lightning-moondream label``: returns the exit status (0, or 1 on an error)."""
    args = build_parser().parse_args(list(argv))
    if args.max_concurrency < 1:
        print("error: --max-concurrency must be at least 1", file=sys.stderr)
        return 1
    try:
        what = labelling_input(
            args.images, args.data, args.data_format, _split(args.classes), args.split
        )
        run = asyncio.run(_run(args, what))
    except (EvaluationError, LabellingError, DatasetError, TuningAPIError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"labelled {run.labelled} images ({run.resumed} done by an earlier run) into {run.output}"
    )
    for name, path in run.files.items():
        print(f"  {name}: {path}")
    return 0
