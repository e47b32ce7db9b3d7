"""Synthetic scenes: deterministic, valid boxes, consistent tasks."""

from __future__ import annotations

import pytest

from lightning_moondream.data import synthetic
from lightning_moondream.rewards import normalize_answer


def test_scenes_are_deterministic() -> None:
    first, second = synthetic.make_scene(42), synthetic.make_scene(42)
    assert first.objects == second.objects
    assert first.image.tobytes() == second.image.tobytes()
    assert synthetic.make_scene(43).objects != first.objects


@pytest.mark.parametrize("seed", range(20))
def test_objects_are_valid_and_drawn(seed: int) -> None:
    scene = synthetic.make_scene(seed, size=64, max_objects=4)
    assert scene.image.mode == "RGB" and scene.image.size == (64, 64)
    assert 1 <= len(scene.objects) <= 4
    for obj in scene.objects:
        x_min, y_min, x_max, y_max = obj.box
        assert 0 <= x_min < x_max <= 1 and 0 <= y_min < y_max <= 1
        assert obj.shape in synthetic.SHAPES and obj.color in synthetic.COLORS
        assert obj.name == f"{obj.color} {obj.shape}"
        x, _ = obj.center
        # Three quarters down the box lies inside every shape; the background is grey.
        pixel = scene.image.getpixel(
            (min(63, int(x * 64)), min(63, int((y_min + 3 * y_max) / 4 * 64)))
        )
        assert len(set(pixel)) > 1


def test_splits_are_disjoint() -> None:
    assert (
        synthetic.split_seed("train", 5)
        != synthetic.split_seed("val", 5)
        != synthetic.split_seed("test", 5)
    )
    assert synthetic.split_seed("val", 0) > synthetic.split_seed("train", 999_999_999)
    with pytest.raises(ValueError, match="split"):
        synthetic.split_seed("dev", 0)
    with pytest.raises(ValueError, match="index"):
        synthetic.split_seed("train", -1)


@pytest.mark.parametrize("seed", range(10))
def test_tasks_match_the_objects(seed: int) -> None:
    scene = synthetic.make_scene(seed)
    detect = dict(synthetic.detect_tasks(scene))
    point = dict(synthetic.point_tasks(scene))
    assert detect.keys() == point.keys()
    for obj in scene.objects:
        for phrase in (obj.shape, f"{obj.color} shape", obj.name):
            assert obj.box in detect[phrase]
            assert obj.center in point[phrase]
    absent = [phrase for phrase, boxes in detect.items() if not boxes]
    assert len(absent) == 1 and absent[0] not in {obj.name for obj in scene.objects}
    for question, answers in synthetic.query_tasks(scene):
        if question.startswith("How many"):
            shape = question.split()[2][:-1]
            count = sum(obj.shape == shape for obj in scene.objects)
            assert normalize_answer(answers[1]) == str(count) == answers[0]
        elif question.startswith("What color"):
            shape = question.split()[-1][:-1]
            assert answers == [next(obj.color for obj in scene.objects if obj.shape == shape)]
        else:
            color = question.split()[-2]
            assert answers == [next(obj.shape for obj in scene.objects if obj.color == color)]
