"""The readers' shared duplicate-key check: first occurrence wins, across batches."""

from __future__ import annotations

import random

from etl_tasks.sources.files import DuplicateKeys


def test_first_occurrence_wins_within_and_across_batches():
    keys = DuplicateKeys()
    assert keys.flags(["R1", "R2", " R1 ", None, "", "  "]) == [
        False, False, True, False, False, False,
    ]  # fmt: skip
    assert keys.flags(["R3", "R2", "R3", "R4"]) == [False, True, True, False]
    assert keys.flags(["R4", "R1", "R5"]) == [True, True, False]
    assert keys.flags([]) == []


def test_matches_a_plain_set_on_many_random_batches():
    """The sorted digest array answers exactly like a set of the keys, batch after batch."""
    rng = random.Random(7)
    keys, seen = DuplicateKeys(), set()
    for _ in range(60):
        batch = [f"K{rng.randrange(3000)}" for _ in range(rng.randrange(0, 120))]
        expected = []
        for key in batch:
            expected.append(key in seen)
            seen.add(key)
        assert keys.flags(batch) == expected
