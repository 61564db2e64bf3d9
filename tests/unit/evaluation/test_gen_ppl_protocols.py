"""Generative perplexity's bookkeeping, by hand: which windows score which tokens under each
protocol, and a sample cut into documents at EOS (decoding would drop EOS and glue them)."""
import pytest

from pgm_dist.evaluation.gen_ppl import eval_samplers, scored_windows, split_documents


@pytest.mark.parametrize("length, context, max_length, protocol, windows", [
    (6, 1, 8, "first", [(0, 6, 1)]),  # fits: the boundary token is context, 1..5 scored
    (6, 1, 8, "strided", [(0, 6, 1)]),
    (20, 1, 8, "first", [(0, 8, 1)]),  # the paper's protocol: positions 1..7 only
    # every half window: 1..7, then 8..11 with 4 ids before, 12..15, 16..19
    (20, 1, 8, "strided", [(0, 8, 1), (4, 12, 8), (8, 16, 12), (12, 20, 16)]),
    (9, 1, 8, "strided", [(0, 8, 1), (4, 9, 8)]),
    (5, 0, 8, "first", [(0, 5, 1)]),  # no boundary token: the first id cannot be scored
    (1, 1, 8, "first", []),  # an empty document: nothing to score
])
def test_windows_score_each_position_once(length, context, max_length, protocol, windows):
    assert scored_windows(length, context, max_length, protocol) == windows
    scored = [i for start, end, first in windows for i in range(first, end)]
    assert len(scored) == len(set(scored))
    if protocol == "strided":
        assert scored == list(range(max(context, 1), length))


def test_an_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="unknown gen-PPL protocol 'all'"):
        scored_windows(10, 1, 8, "all")


@pytest.mark.parametrize("ids, documents", [
    ([5, 6, 2, 7, 8, 9], [[5, 6], [7, 8, 9]]),
    ([2, 5, 2, 2, 6, 2], [[5], [6]]),
    ([2, 2], []),
    ([5, 6, 7], [[5, 6, 7]]),
])
def test_samples_are_cut_into_documents_at_eos(ids, documents):
    assert split_documents(ids, eos_id=2) == documents


def test_the_samplers_of_each_choice():
    assert eval_samplers("both", "pgm") == ["uniform", "binomial"]
    assert eval_samplers("binomial", "pgm") == ["binomial"]
    assert eval_samplers("both", "mdlm") == ["ancestral"]
