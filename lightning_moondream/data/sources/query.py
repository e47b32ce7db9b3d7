"""Query samples: counting and presence questions from boxes, class questions from labels.

From annotated images (any detection source), per (image, class) prompt (classes
present, plus absent ones drawn at ``negative_rate`` as for detect prompts):

- ``"count"``: ``"How many {name} are there?"`` with answers ``["3", "three"]``;
- ``"presence"``: ``"Is there a {name}?"`` with answer ``["yes"]`` or ``["no"]``.

From a classification dataset (``ImageFolder``, CIFAR, or any dataset of ``(image,
class index)`` with a ``classes`` list): ``"What is in this image?"`` answered by the
class name.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets import DatasetFolder

from lightning_moondream.data.records import (
    AnnotatedImage,
    as_image,
    format_prompt,
    prompt_index,
    resolve_image,
)
from lightning_moondream.data.samples import QuerySample

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
)  # fmt: skip
QUESTION_KINDS = ("count", "presence")
DEFAULT_TEMPLATES = {"count": "How many {name} are there?", "presence": "Is there a {name}?"}


def count_answers(count: int) -> tuple[str, ...]:
    """Accepted answers for a count: digits, and the word up to twenty."""
    return (str(count), NUMBER_WORDS[count]) if count < len(NUMBER_WORDS) else (str(count),)


class DetectionQuestions(Dataset):
    """Counting and presence questions about annotated images.

    Args:
        images: The annotated images.
        classes: Every class name.
        kinds: Which questions to ask, among ``"count"`` and ``"presence"``.
        templates: Question template of each kind, with ``{name}``; defaults in
            ``DEFAULT_TEMPLATES``.
        negative_rate: Probability, per image and absent class, of questions about it.
        seed: Seed of the negative draws.
        groups: Names grouping other classes (supercategories), never asked as absent.
        phrase_labels: Write class names as phrases in questions (``black-king`` as
            ``black king``); sample ids keep the names.
    """

    def __init__(
        self,
        images: Sequence[AnnotatedImage],
        classes: Sequence[str],
        *,
        kinds: Sequence[str] = QUESTION_KINDS,
        templates: dict[str, str] | None = None,
        negative_rate: float = 0.0,
        seed: int = 0,
        groups: Collection[str] = (),
        phrase_labels: bool = False,
    ) -> None:
        unknown = set(kinds) - set(QUESTION_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be among {QUESTION_KINDS}, got {list(kinds)}")
        self.images = list(images)
        self.kinds = tuple(kinds)
        self.templates = {**DEFAULT_TEMPLATES, **(templates or {})}
        self.phrase_labels = phrase_labels
        prompts = prompt_index(
            self.images, list(classes), negative_rate=negative_rate, seed=seed, groups=groups
        )
        self.index = [(position, name, kind) for position, name in prompts for kind in self.kinds]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> QuerySample:
        position, name, kind = self.index[index]
        record = self.images[position]
        # A keypoint marks one instance, as a box does.
        count = record.labels.count(name) + record.point_labels.count(name)
        answers = count_answers(count) if kind == "count" else ("yes" if count else "no",)
        return QuerySample(
            image=resolve_image(record.image),
            question=format_prompt(self.templates[kind], name, phrase=self.phrase_labels),
            answers=answers,
            id=f"{record.id}#{kind}:{name}",
            image_size=record.size,
        )


class ClassificationQuestions(Dataset):
    """One question per image of a classification dataset, answered by its class name.

    ``ImageFolder``-style datasets (``DatasetFolder``) give file paths, so nothing is
    decoded until the worker encodes the image; others are indexed in the worker.

    Args:
        dataset: A dataset of ``(image, class index)`` with a ``classes`` list, or any
            such dataset together with ``classes``.
        question: The question asked of every image.
        classes: Class names by index; default: ``dataset.classes``.
    """

    def __init__(
        self,
        dataset: Any,
        question: str = "What is in this image?",
        classes: Sequence[str] | None = None,
    ) -> None:
        names = classes if classes is not None else getattr(dataset, "classes", None)
        if names is None:
            raise ValueError(f"{type(dataset).__name__} has no 'classes'; pass classes=[...]")
        self.dataset = dataset
        self.question = question
        self.classes = list(names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> QuerySample:
        where = f"item {index} of {type(self.dataset).__name__}"
        if isinstance(self.dataset, DatasetFolder):
            # The file itself, untouched by the dataset's tensor transforms.
            image, label = self.dataset.samples[index]
        else:
            image, label = self.dataset[index]
            image = as_image(image, where)
        return QuerySample(
            image=image,
            question=self.question,
            answers=(self.classes[int(label)],),
            id=image if isinstance(image, str) else where,
        )
