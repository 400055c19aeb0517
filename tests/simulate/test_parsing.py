"""Simulator answers: the accepted JSON forms, and typed failures for everything else."""

from __future__ import annotations

import numpy as np
import pytest

from builder.simulate.base import FailureKind, SimulationFailure
from builder.simulate.parsing import extract_json, parse_cell_values, parse_phrases, parse_token_values


@pytest.mark.parametrize(
    "answer",
    [
        '{"activations": [0, 10, 3]}',
        '```json\n{"activations": [0, 10, 3]}\n```',
        'Here you go: [0, "10", 3.0] hope it helps',
        '{"activations": [["the", 0], [" red", 10], [" car", 3]]}',
        '{"activations": [{"token": "the", "activation": 0}, {"token": "red", "activation": 12}, '
        '{"token": "car", "activation": 3}]}',
        '{"predictions": [0, 10, 3]}',
    ],
)
def test_token_values_accepted_forms(answer):
    np.testing.assert_array_equal(parse_token_values(answer, 3), [0, 10, 3])


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        ("", FailureKind.UNPARSABLE),
        ("I'm sorry, I can't help with that.", FailureKind.UNPARSABLE),
        ('{"activations": [0, 10', FailureKind.UNPARSABLE),
        ('{"activations": [0, "high", 3]}', FailureKind.UNPARSABLE),
        ('{"activations": [0, null, 3]}', FailureKind.UNPARSABLE),
        ('{"activations": [0, true, 3]}', FailureKind.UNPARSABLE),
        ('{"activations": "0 10 3"}', FailureKind.UNPARSABLE),
        ('{"activations": [0, 10]}', FailureKind.WRONG_LENGTH),
        ('{"activations": [0, 10, 3, 4]}', FailureKind.WRONG_LENGTH),
    ],
)
def test_token_values_failures(answer, kind):
    with pytest.raises(SimulationFailure) as e:
        parse_token_values(answer, 3)
    assert e.value.kind is kind
    assert str(e.value).startswith(kind.value + ": ")


def test_nan_and_infinity_are_not_values():
    with pytest.raises(SimulationFailure, match="finite"):
        parse_token_values('{"activations": [0, NaN, 1]}', 3)


def test_cell_values_sparse_dict_flat_list_and_rows():
    sparse = parse_cell_values('{"activations": {"1": 10, "4": 5.5}}', 2, 2)
    np.testing.assert_array_equal(sparse, [[10, 0], [0, 5.5]])
    np.testing.assert_array_equal(parse_cell_values('{"activations": {}}', 2, 2), np.zeros((2, 2)))
    np.testing.assert_array_equal(parse_cell_values("[1, 2, 3, 4]", 2, 2), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(parse_cell_values('{"cells": [[1, 2], [3, 4]]}', 2, 2), [[1, 2], [3, 4]])


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        ('{"activations": {"5": 3}}', FailureKind.UNPARSABLE),
        ('{"activations": {"top-left": 3}}', FailureKind.UNPARSABLE),
        ("[1, 2, 3]", FailureKind.WRONG_LENGTH),
        ("[[1, 2], [3]]", FailureKind.WRONG_LENGTH),
        ("no idea", FailureKind.UNPARSABLE),
    ],
)
def test_cell_values_failures(answer, kind):
    with pytest.raises(SimulationFailure) as e:
        parse_cell_values(answer, 2, 2)
    assert e.value.kind is kind


def test_phrases():
    assert parse_phrases('{"phrases": ["Red car.", "red car", "  a   train "]}', 3) == ["Red car", "a train"]
    assert parse_phrases('["a", "b", "c", "d"]', 2) == ["a", "b"]
    assert parse_phrases('{"phrases": []}', 3) == []
    with pytest.raises(SimulationFailure):
        parse_phrases('{"phrases": "red car"}', 3)
    with pytest.raises(SimulationFailure):
        parse_phrases('{"phrases": [1, 2]}', 3)


def test_extract_json_skips_broken_brackets():
    assert extract_json('see [note] then {"a": 1}') == {"a": 1}
