"""The demo billing manifest counts claims with a defect, which is what a run quarantines."""

from etl_tasks.demo_data import (
    CLAIM_DEFECTS,
    expected_claim_defects,
    expected_defective_claims,
)


def _brute(first, last):
    return sum(1 for i in range(first, last + 1) if any(i % p == 0 for p in CLAIM_DEFECTS.values()))


def test_a_claim_with_two_defects_is_one_defective_row():
    # 1009 * 1013: the first claim id that breaks two rules.
    both = CLAIM_DEFECTS["amount_not_positive"] * CLAIM_DEFECTS["cpt_code_length"]
    assert expected_defective_claims(both, both) == 1
    assert sum(expected_claim_defects(both, both).values()) == 2


def test_defective_rows_match_counting_them():
    for first, last in ((1, 5_000), (1, 1_000_000), (1_020_000, 1_045_000), (7, 6)):
        assert expected_defective_claims(first, last) == _brute(first, last)


def test_five_million_claims_quarantine_fewer_rows_than_defects():
    # The figures of issue 12: 19,693 defects planted on 19,669 claims.
    assert sum(expected_claim_defects(1, 5_000_000).values()) == 19_693
    assert expected_defective_claims(1, 5_000_000) == 19_669
