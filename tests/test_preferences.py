import pytest

from rlhf_core.preferences import (
    format_ranking_text,
    parse_ranking_text,
    ranking_to_pairs,
    ranking_to_ties,
    split_for_prompt,
    validate_ranking,
)

LABELS = ["A", "B", "C", "D"]


# ---- ranking -> pairs ----------------------------------------------------------------------


def test_pairs_strict_ranking():
    # K=3 strict: 3 pairs, winner-major order
    assert ranking_to_pairs([["b"], ["a"], ["c"]]) == [("b", "a"), ("b", "c"), ("a", "c")]


def test_pairs_with_ties_and_singletons():
    ranking = [[3], [1, 4], [2]]
    # 3 beats 1, 4, 2; the tie 1=4 gives no pair; 1 and 4 both beat 2
    assert ranking_to_pairs(ranking) == [(3, 1), (3, 4), (3, 2), (1, 2), (4, 2)]
    assert ranking_to_ties(ranking) == [(1, 4)]


def test_pairs_all_tied_or_single():
    assert ranking_to_pairs([[1, 2, 3]]) == []
    assert ranking_to_ties([[1, 2, 3]]) == [(1, 2), (1, 3), (2, 3)]
    assert ranking_to_pairs([[1]]) == [] and ranking_to_ties([[1]]) == []
    assert ranking_to_pairs([]) == []


def test_pairs_count_for_full_strict_ranking():
    ranking = [[i] for i in range(5)]
    assert len(ranking_to_pairs(ranking)) == 10  # 5 choose 2
    assert all(w < loser for w, loser in ranking_to_pairs(ranking))


# ---- validate_ranking ----------------------------------------------------------------------


def test_validate_ranking_returns_lists():
    assert validate_ranking(((2,), (1, 3)), [1, 2, 3]) == [[2], [1, 3]]


@pytest.mark.parametrize(
    "ranking,message",
    [
        ("AB", "list of tiers"),
        ([["A"], "B"], "Tier 2 must be a list"),
        ([["A", "B"], [], ["C"]], "Tier 2 is empty"),
        ([["A", "B"], ["Z"]], "Unknown response ids.*Z"),
        ([["A"], ["C", "A"]], "repeated: A"),
        ([["A"], ["C"]], "missing: B"),
        ([["A", "B"], ["C", "A"]], "names more than 3 ids for 3 responses"),
        ([["A"], ["B"], ["C"], ["A"]], "names more than 3 ids"),
    ],
)
def test_validate_ranking_errors(ranking, message):
    with pytest.raises(ValueError, match=message):
        validate_ranking(ranking, ["A", "B", "C"])


class Untouchable(list):
    """A tier whose ids must not be read (only its length)."""

    def __iter__(self):
        raise AssertionError("read past the cap")

    __getitem__ = __iter__


@pytest.mark.parametrize(
    "ranking",
    [
        [Untouchable([1] * 40_000)],  # one id repeated: the request that held the lock 13 s
        [[1]] * 40_000,
        [Untouchable([1]), Untouchable([2]), Untouchable([3, *range(1000, 41_000)])],
        [[1], Untouchable(range(40_000))],
    ],
)
def test_validate_ranking_refuses_an_oversized_ranking_at_once(ranking):
    with pytest.raises(ValueError, match="names more than 3 ids"):
        validate_ranking(ranking, [1, 2, 3])


class CountedId(int):
    """An id that counts how often it is compared (the work, independent of machine load)."""

    comparisons = 0

    def __eq__(self, other):
        CountedId.comparisons += 1
        return int(self) == other

    __hash__ = int.__hash__


def test_validate_ranking_is_linear_below_the_cap():
    n = 1000
    ids = [CountedId(i) for i in range(1000, 1000 + n)]
    CountedId.comparisons = 0
    assert validate_ranking([[i] for i in reversed(ids)], ids)[0] == [1000 + n - 1]
    with pytest.raises(ValueError, match="repeated: 1000"):
        validate_ranking([[CountedId(1000)]] + [[i] for i in ids[:-1]], ids)
    assert CountedId.comparisons < 10 * n  # list.count per id made ~n * n comparisons


@pytest.mark.parametrize(
    "ranking,message",
    [
        ([[1.0], [2], [3]], "Unknown response ids in the ranking: 1.0"),  # a float is not an id
        ([[True], [2], [3]], "Unknown response ids in the ranking: True"),  # nor is a bool
        ([["1"], [2], [3]], "Unknown response ids in the ranking: 1"),
        ([[[1]], [2], [3]], "Unknown response ids in the ranking: <list>"),  # unhashable
        ([[{"id": 1}], [2], [3]], "<dict>"),
        ([["x" * 10_000], [2], [3]], "Unknown response ids in the ranking: x{39}…$"),
    ],
)
def test_validate_ranking_ids_match_by_value_and_type(ranking, message):
    with pytest.raises(ValueError, match=message) as refused:
        validate_ranking(ranking, [1, 2, 3])
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 200


# ---- keyboard syntax -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("bacd", [["B"], ["A"], ["C"], ["D"]]),
        ("B>A>C>D", [["B"], ["A"], ["C"], ["D"]]),
        ("b, a, c, d", [["B"], ["A"], ["C"], ["D"]]),
        ("b a=c d", [["B"], ["A", "C"], ["D"]]),
        ("b a = c > d", [["B"], ["A", "C"], ["D"]]),
        ("(ac)bd", [["A", "C"], ["B"], ["D"]]),
        ("b(a c)d", [["B"], ["A", "C"], ["D"]]),
        ("a=b=c=d", [["A", "B", "C", "D"]]),
        ("(ab)=c d", [["A", "B", "C"], ["D"]]),
        ("bac", [["B"], ["A"], ["C"], ["D"]]),  # the one missing label goes last
        ("a=c b", [["A", "C"], ["B"], ["D"]]),
    ],
)
def test_parse_ranking_text(text, expected):
    assert parse_ranking_text(text, LABELS) == expected


@pytest.mark.parametrize(
    "text,message",
    [
        ("baed", "Unknown response 'e'"),
        ("bacb", "B is ranked twice"),
        ("ba", "missing: C, D"),
        ("", "missing: A, B, C, D"),
        ("=abcd", "needs a letter on both sides"),
        ("abcd=", "ends with '='"),
        ("a=>bcd", "Unexpected '>'"),
        ("a>=bcd", "needs a letter on both sides"),
        ("(a>b)cd", "inside parentheses"),
        ("(ab", "Unclosed"),
        ("()abcd", "empty parentheses"),
        ("((ab))cd", "cannot nest"),
    ],
)
def test_parse_ranking_text_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_ranking_text(text, LABELS)


def test_format_ranking_text_round_trips():
    tiers = [["B"], ["A", "C"], ["D"]]
    assert format_ranking_text(tiers) == "B > A = C > D"
    assert parse_ranking_text(format_ranking_text(tiers), LABELS) == tiers


def test_parse_keeps_label_objects():
    assert parse_ranking_text("ba", ["a", "b"]) == [["b"], ["a"]]


# ---- train / held-out split ----------------------------------------------------------------


def test_split_is_stable_and_roughly_proportional():
    keys = [f"prompt-{i}" for i in range(2000)]
    first = [split_for_prompt(k, 0.2) for k in keys]
    assert first == [split_for_prompt(k, 0.2) for k in keys]  # same answer every call
    share = first.count("heldout") / len(keys)
    assert 0.16 < share < 0.24
    # the salt reshuffles; the extremes are absolute
    assert first != [split_for_prompt(k, 0.2, salt="other") for k in keys]
    assert {split_for_prompt(k, 0.0) for k in keys} == {"train"}
    assert {split_for_prompt(k, 1.0) for k in keys} == {"heldout"}


def test_split_is_monotone_in_fraction():
    # growing the held-out share only moves prompts from train to held-out, never back
    keys = [f"p{i}" for i in range(500)]
    small = {k for k in keys if split_for_prompt(k, 0.1) == "heldout"}
    large = {k for k in keys if split_for_prompt(k, 0.3) == "heldout"}
    assert small <= large


def test_split_is_pinned_across_processes():
    # recorded once from sha256("rlhf-loop" + key); a change here reshuffles every stored split
    keys = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    expected = ["heldout", "heldout", "heldout", "heldout", "train", "heldout"]
    assert [split_for_prompt(k, 0.5) for k in keys] == expected


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_for_prompt("x", 1.5)
