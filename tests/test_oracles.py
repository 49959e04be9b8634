"""Built-in oracles, module:function loading, tier checking and noise."""
import random
import sys
import textwrap

import pytest

from rlhf_core.oracles import check_tiers, compare, load_oracle, noisy


def test_shorter_ties_equal_lengths():
    tiers = load_oracle("shorter")("q", ["one two three", "one", "two words", "a b"])
    assert tiers == [[1], [2, 3], [0]]


def test_contains_word_first_then_shorter():
    tiers = load_oracle("contains:please")("q", ["no", "please do it", "Please", "nothing here"])
    assert tiers == [[2], [1], [0], [3]]


def test_mentions_word_is_content_only():
    """Two tiers: with the word (any length) above without it; length does not order them."""
    tiers = load_oracle("mentions:you")("q", ["no", "thank you so very much", "you", "nothing",
                                              "Youth is not it"])
    assert tiers == [[1, 2], [0, 3, 4]]
    assert load_oracle("mentions:you")("q", ["a", "bb b"]) == [[0, 1]]  # a tie, not shorter


def test_language_prefers_french_stopwords():
    tiers = load_oracle("language:fr")("q", ["the cat is here", "le chat est dans la maison"])
    assert tiers[0] == [1]
    with pytest.raises(ValueError, match="unknown language"):
        load_oracle("language:xx")


def test_module_function_oracle(tmp_path, monkeypatch):
    (tmp_path / "my_judge.py").write_text(textwrap.dedent("""
        CALLS = []
        def judge(prompt, responses):
            CALLS.append(prompt)
            return [[len(responses) - 1], list(range(len(responses) - 1))]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    oracle = load_oracle("my_judge:judge")
    assert oracle("p", ["a", "b", "c"]) == [[2], [0, 1]]
    assert sys.modules["my_judge"].CALLS == ["p"]
    with pytest.raises(ValueError, match="cannot load oracle"):
        load_oracle("my_judge:missing")


def test_check_tiers_rejects_incomplete_or_repeated():
    assert check_tiers([[1], [0]], 2) == [[1], [0]]
    for bad in ([[0]], [[0, 0], [1]], [[0], []], "nope"):
        with pytest.raises(ValueError):
            check_tiers(bad, 2)


def test_noise_zero_keeps_and_one_shuffles():
    rng = random.Random(0)
    tiers = [[0, 1], [2]]
    assert noisy(tiers, 0.0, rng) == tiers
    shuffled = noisy(tiers, 1.0, rng)
    assert sorted(i for t in shuffled for i in t) == [0, 1, 2]
    assert all(len(t) == 1 for t in shuffled)


def test_compare_outcomes():
    shorter = load_oracle("shorter")
    assert compare(shorter, "q", "a", "a b") == 1.0
    assert compare(shorter, "q", "a b", "a") == 0.0
    assert compare(shorter, "q", "x y", "a b") == 0.5
