"""JSON on the wire: what orjson writes and reads, and where the standard parser takes over."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_moondream.api import wire


def test_numbers_of_any_kind_are_written_as_plain_numbers() -> None:
    class Score(float):
        pass

    value = {"reward": np.float64(0.25), "count": np.int64(3), "score": Score(0.5), "x": [1, 2.5]}
    assert wire.loads(wire.dumps(value)) == {
        "reward": 0.25,
        "count": 3,
        "score": 0.5,
        "x": [1, 2.5],
    }


def test_what_json_cannot_hold_is_refused_or_written_as_null() -> None:
    with pytest.raises(TypeError, match="not JSON serializable: object"):
        wire.dumps({"value": object()})
    assert wire.dumps([math.nan, math.inf]) == b"[null,null]"


def test_nan_written_by_python_programs_is_read_so_validation_can_name_it() -> None:
    assert math.isnan(wire.loads(b'{"rewards": [NaN, 1]}')["rewards"][0])


def test_what_is_not_json_is_a_value_error_naming_the_position() -> None:
    with pytest.raises(ValueError, match="Expecting value: line 1 column 1"):
        wire.loads(b"<html>busy</html>")
    with pytest.raises(ValueError):
        wire.loads(b"\xff\xfe{}")
