"""Errors and warnings about datasets, each naming the file and annotation at fault."""

from __future__ import annotations

import warnings


class DatasetError(ValueError):
    """A dataset cannot be used as given: unreadable image, bad or missing annotation.

    The message always names the file, and the annotation within it where there is one,
    e.g. ``labels/img3.txt line 2: class id 7 not in 3 classes``.
    """


class MissingPackageError(DatasetError):
    """A dataset needs an optional package that is not installed.

    The message names the command that installs it; no other folder or file of the same
    kind would load without it.
    """


class DatasetWarning(UserWarning):
    """An annotation was repaired (a box clamped into the image) or dropped."""


def warn(message: str) -> None:
    """Emit a :class:`DatasetWarning` attributed to the caller of the loader."""
    warnings.warn(message, DatasetWarning, stacklevel=3)
