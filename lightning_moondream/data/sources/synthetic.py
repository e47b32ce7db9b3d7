"""Samples from seeded synthetic scenes of coloured shapes (no files, no downloads).

Scene ``i`` of a split is ``make_scene(split_seed(split, i) + seed)``: the same index
always gives the same scene, and the splits never share one. Every task of every
scene becomes a sample (its detect, point or query tasks), or, with
``tasks_per_image``, that many tasks per scene and skill, chosen by a seeded draw. The
scene is rendered again in ``__getitem__`` (in the worker), so a dataset holds no pixels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from lightning_moondream.api.models import Box, Point
from lightning_moondream.data.samples import DetectSample, PointSample, QuerySample
from lightning_moondream.data.synthetic import (
    Scene,
    detect_tasks,
    make_scene,
    point_tasks,
    query_tasks,
    split_seed,
)

SKILLS = ("detect", "point", "query")


def _tasks(scene: Scene, skill: str) -> list[tuple[str, list[Any]]]:
    if skill == "detect":
        return [(phrase, list(boxes)) for phrase, boxes in detect_tasks(scene)]
    if skill == "point":
        return [(phrase, list(points)) for phrase, points in point_tasks(scene)]
    return [(question, list(answers)) for question, answers in query_tasks(scene)]


class SyntheticShapes(Dataset):
    """Detect, point and query samples over synthetic scenes.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_images: Number of scenes.
        skills: Skills to draw tasks for, among ``"detect"``, ``"point"``, ``"query"``.
        size: Side of the square images in pixels.
        seed: Offset added to every scene's seed, for a different set of scenes.
        max_objects: Largest number of objects per scene.
        tasks_per_image: Tasks per scene and skill; ``None`` takes every task (listing
            them renders each scene once, up front).
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int = 64,
        skills: Sequence[str] = ("detect",),
        size: int = 128,
        seed: int = 0,
        max_objects: int = 4,
        tasks_per_image: int | None = None,
    ) -> None:
        if isinstance(skills, str):
            skills = (skills,)
        unknown = [skill for skill in skills if skill not in SKILLS]
        if unknown or not skills:
            raise ValueError(f"skills must be among {', '.join(SKILLS)}, got {list(skills)}")
        if num_images < 0:
            raise ValueError(f"num_images must not be negative, got {num_images}")
        if tasks_per_image is not None and tasks_per_image < 1:
            raise ValueError(f"tasks_per_image must be at least 1, got {tasks_per_image}")
        split_seed(split, max(num_images - 1, 0))
        self.split = split
        self.skills = tuple(skills)
        self.size = size
        self.seed = seed
        self.max_objects = max_objects
        self.tasks_per_image = tasks_per_image
        self.index: list[tuple[int, str, int]] = []
        for image in range(num_images):
            for skill in self.skills:
                if tasks_per_image is None:
                    count = len(_tasks(self._scene(image), skill))
                else:
                    count = tasks_per_image
                self.index.extend((image, skill, task) for task in range(count))

    def _scene(self, image: int) -> Scene:
        return make_scene(
            split_seed(self.split, image) + self.seed, size=self.size, max_objects=self.max_objects
        )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> DetectSample | PointSample | QuerySample:
        image, skill, task = self.index[index]
        scene = self._scene(image)
        tasks = _tasks(scene, skill)
        if self.tasks_per_image is not None:
            order = list(range(len(tasks)))
            random.Random(f"{scene.seed}:{skill}").shuffle(order)
            task = order[task % len(order)]
        phrase, truth = tasks[task]
        sample_id = f"synthetic-{self.split}-{image}#{skill}:{phrase}"
        size = (self.size, self.size)
        if skill == "detect":
            boxes = tuple(Box(x_min=b[0], y_min=b[1], x_max=b[2], y_max=b[3]) for b in truth)
            return DetectSample(scene.image, phrase, boxes, id=sample_id, image_size=size)
        if skill == "point":
            points = tuple(Point(x=x, y=y) for x, y in truth)
            return PointSample(scene.image, phrase, points=points, id=sample_id, image_size=size)
        return QuerySample(scene.image, phrase, tuple(truth), id=sample_id, image_size=size)
