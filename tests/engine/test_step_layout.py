"""The vectorised positions and KV slots of a step's rows equal the per-row formula they replace."""
from __future__ import annotations

import random

import pytest

from mixquant.engine.model_runner import rows_positions_and_slots


def per_row(segments, block_size):
    positions, slots = [], []
    for table, start, end in segments:
        positions += range(start, end)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
    return positions, slots


@pytest.mark.parametrize("block_size", [1, 16])
def test_positions_and_slots_match_the_per_row_formula(block_size):
    rng = random.Random(block_size)
    segments = []
    for start, end in [(0, 1), (0, 37), (5, 6), (16, 32), (15, 17), (31, 300), (1000, 1001), (3, 4)]:
        table = rng.sample(range(10_000), (end - 1) // block_size + 2)  # random block ids, one spare at the end
        segments.append((table, start, end))
    blocks = [b for table, start, end in segments for b in table[start // block_size:(end - 1) // block_size + 1]]
    positions, slots = rows_positions_and_slots([s for _, s, _ in segments], [e for _, _, e in segments], blocks,
                                                block_size)
    assert (positions.tolist(), slots.tolist()) == per_row(segments, block_size)


def test_a_single_row():
    positions, slots = rows_positions_and_slots([20], [21], [7], 16)
    assert positions.tolist() == [20] and slots.tolist() == [7 * 16 + 4]
