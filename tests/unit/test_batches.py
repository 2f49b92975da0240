"""How a micro-batch is cut into forward passes (batches.length_groups): the cheapest split, never a lost row."""

from __future__ import annotations

import itertools
import random

import pytest

from aitraining.batches import length_groups


def _cost(lengths: list[int], groups: list[list[int]], per_forward: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g) for g in groups) + per_forward * (len(groups) - 1)


def _cheapest(lengths: list[int], per_forward: int) -> int:
    """Brute force: every way to cut the rows, sorted by length, into consecutive groups."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        groups, current = [], [order[0]]
        for cut, i in zip(cuts, order[1:], strict=True):
            if cut:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        cost = _cost(lengths, groups, per_forward)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("per_forward", [0, 16, 64, 1000])
def test_length_groups_are_the_cheapest_split_of_every_row(per_forward):
    rng = random.Random(per_forward)
    for _ in range(200):
        lengths = [rng.choice([rng.randint(5, 40), rng.randint(100, 400)]) for _ in range(rng.randint(1, 9))]
        groups = length_groups(lengths, per_forward)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each row once
        assert all(g for g in groups)
        assert _cost(lengths, groups, per_forward) == _cheapest(lengths, per_forward)


def test_length_groups_keep_the_batch_whole_when_asked_or_when_it_does_not_pay():
    assert length_groups([30, 300, 31], None) == [[0, 2, 1]]
    assert length_groups([100, 101, 99, 100], 64) == [[2, 0, 3, 1]]  # a pass costs more than the padding it saves
    assert length_groups([20, 20, 20, 900], 64) == [[0, 1, 2], [3]]  # one long row no longer pads three short ones
    assert length_groups([], 64) == [[]]
