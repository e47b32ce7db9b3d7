"""Which classes of a detection dataset become prompts, and which may be asked as absent.

Exports declare classes no prompt should use as they are. Roboflow's COCO exports list
their supercategory (e.g. ``pieces``) as a category of its own with no boxes; a stray
class may hold one box in the whole export (``bishop`` beside ``black-bishop`` and
``white-bishop``). Asked as absent, such classes make prompts whose empty ground truth
is wrong on images full of those objects. So, for the images read:

- a COCO category without any annotation (box or keypoint) in the file read is
  dropped, with a :class:`~lightning_moondream.data.errors.DatasetWarning` naming it
  (other formats list the classes they annotate, or a split may simply lack one: its
  negatives are then true);
- a class with few annotations, fewer than :data:`RARE_COUNT` or under
  :data:`RARE_SHARE` of all of them, is kept and reported in a warning naming it with
  its count: it teaches little, and may be a mislabelled variant of another class;
- a negative prompt (about a class absent from an image) never uses a group name (a
  COCO supercategory of other categories) nor a class whose words are part of the
  words of a class present in the image (no ``bishop`` where a ``black-bishop`` is);
- with ``phrase_labels``, prompts use class names as phrases: ``black-king`` becomes
  ``black king``, ``traffic_light`` becomes ``traffic light``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from lightning_moondream.data.errors import warn

if TYPE_CHECKING:
    from lightning_moondream.data.records import AnnotatedImage

RARE_COUNT = 5
"""A class with fewer annotations than this is reported as rare."""
RARE_SHARE = 0.01
"""A class with less than this share of all annotations is reported as rare."""

_SEPARATORS = re.compile(r"[-_\s]+")


def class_words(name: str) -> tuple[str, ...]:
    """The lower-cased words of a class name, split on ``-``, ``_`` and spaces."""
    return tuple(word for word in _SEPARATORS.split(name.lower()) if word)


def label_phrase(name: str) -> str:
    """A class name as a phrase: ``black-king`` -> ``black king``."""
    return " ".join(word for word in _SEPARATORS.split(name) if word)


def _is_part(words: tuple[str, ...], of: tuple[str, ...]) -> bool:
    """Whether ``words`` appear together, in order, within ``of``."""
    size = len(words)
    return any(of[start : start + size] == words for start in range(len(of) - size + 1))


def may_be_absent(name: str, present: Collection[str], groups: Collection[str] = ()) -> bool:
    """Whether a negative prompt may ask for ``name`` on an image with ``present`` classes.

    Args:
        name: A class not present in the image.
        present: The classes present in the image.
        groups: Names that group other classes (supercategories), never negatives.
    """
    if name in groups:
        return False
    words = class_words(name)
    return not any(_is_part(words, class_words(other)) for other in present)


def _counts(images: Sequence[AnnotatedImage]) -> Counter[str]:
    return Counter(label for image in images for label in (*image.labels, *image.point_labels))


def annotated_classes(
    images: Sequence[AnnotatedImage], classes: Sequence[str], where: str
) -> list[str]:
    """``classes`` without those no image annotates, which a warning names.

    Args:
        images: The annotated images read.
        classes: The classes the dataset declares.
        where: The dataset, for the warning.
    """
    counts = _counts(images)
    unused = [name for name in classes if not counts[name]]
    if unused:
        warn(f"{where}: classes without annotations are not prompted: {', '.join(unused)}")
    return [name for name in classes if counts[name]]


def report_rare_classes(
    images: Sequence[AnnotatedImage], classes: Sequence[str], where: str
) -> None:
    """Warn about classes with few annotations, naming each with its count.

    Args:
        images: The annotated images read.
        classes: The classes prompted.
        where: The dataset, for the warning.
    """
    counts = _counts(images)
    total = sum(counts.values())
    rare = [
        f"{name} ({counts[name]})"
        for name in classes
        if counts[name] > 0 and (counts[name] < RARE_COUNT or counts[name] < RARE_SHARE * total)
    ]
    if rare:
        warn(
            f"{where}: classes with few annotations (under {RARE_COUNT}, or under "
            f"{RARE_SHARE:.0%} of all {total}): {', '.join(rare)}; check they are not "
            "mislabelled variants of another class"
        )
