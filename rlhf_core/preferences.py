"""Rankings -> preference pairs, the keyboard ranking syntax, and train/held-out splits.

A ranking is a list of tiers, best first; each tier is a list of response ids and several ids
in one tier are a tie. Stdlib only: the UI process imports this without torch.
"""

import hashlib
import itertools

_SEPARATORS = {">", ","}


def ranking_to_pairs(ranking: list[list]) -> list[tuple]:
    """Every id in a better tier beats every id in a worse tier; ties give no pair.

    Ordered by the winner's position in the ranking, then the loser's (deterministic, so the
    pairs derived from a stored ranking are reproducible).
    """
    pairs = []
    for i, tier in enumerate(ranking):
        worse = [loser for lower in ranking[i + 1 :] for loser in lower]
        pairs.extend((winner, loser) for winner in tier for loser in worse)
    return pairs


def ranking_to_ties(ranking: list[list]) -> list[tuple]:
    """The unordered pairs inside each tier (each once), e.g. for soft 0.5 targets."""
    return [pair for tier in ranking for pair in itertools.combinations(tier, 2)]


def validate_ranking(ranking, response_ids) -> list[list]:
    """Check a ranking covers every response id exactly once; return it as a list of lists.

    Linear in the size of the ranking, and a ranking naming more ids than there are responses
    is refused before any of them is read (a request of 40,000 ids costs nothing). An id must
    equal a known id *and* have its type: 12.0 or True is not the response 12 or 1.
    Raises ValueError with a message an annotator can act on.
    """
    if not isinstance(ranking, (list, tuple)):
        raise ValueError(f"A ranking must be a list of tiers, got {type(ranking).__name__}")
    known = {(type(rid), rid) for rid in response_ids}
    _check_size(ranking, len(known))
    tiers = []
    for position, tier in enumerate(ranking, start=1):
        if not isinstance(tier, (list, tuple)):
            raise ValueError(
                f"Tier {position} must be a list of response ids, got {type(tier).__name__}"
            )
        if not tier:
            raise ValueError(f"Tier {position} is empty: every tier needs at least one response")
        tiers.append(list(tier))
    seen: set = set()
    unknown, repeated = [], []
    for rid in (rid for tier in tiers for rid in tier):
        key = _key(rid)
        if key not in known:
            unknown.append(rid)
        elif key in seen:
            repeated.append(rid)
        seen.add(key)
    if unknown:
        raise ValueError(f"Unknown response ids in the ranking: {_names(unknown)}")
    if repeated:
        raise ValueError(f"Each response must be ranked once; repeated: {_names(repeated)}")
    missing = [rid for rid in response_ids if (type(rid), rid) not in seen]
    if missing:
        raise ValueError(f"Rank every response; missing: {_names(missing)}")
    return tiers


def _check_size(ranking, k: int) -> None:
    """At most k tiers of at most k ids in all: anything longer has a repeat or a stranger."""
    named = len(ranking)
    if named <= k:
        named = sum(len(t) if isinstance(t, (list, tuple)) else 1 for t in ranking)
    if named > k:
        raise ValueError(f"Each response must be ranked once: this ranking names more than {k} "
                         f"ids for {k} responses")


def _key(rid):
    """(type, id) when the id is hashable; None (never a known key) otherwise."""
    try:
        hash(rid)
    except TypeError:
        return None
    return (type(rid), rid)


def _names(ids) -> str:
    """Each id once, in order, on one short line (an id may be anything a client sent)."""
    unique: dict = {}
    for rid in ids:
        unique.setdefault(_key(rid) or id(rid), rid)
    return ", ".join(_short(rid) for rid in unique.values())


def _short(rid, width: int = 40) -> str:
    if not isinstance(rid, (str, int, float)):  # no str() of a 900-deep list
        return f"<{type(rid).__name__}>"
    text = " ".join(str(rid).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def parse_ranking_text(text: str, labels: list[str]) -> list[list[str]]:
    """Parse the UI's keyboard syntax into tiers of labels, best first.

    Letters are case-insensitive and listed best first. `=` ties the letters on both sides and
    parentheses group a tie: "b a=c d" and "b(ac)d" are [["B"], ["A","C"], ["D"]]. `>`, spaces
    and commas may separate tiers but are optional ("bacd" == "B>A>C>D"). One missing label is
    appended as the last tier, so "bac" ranks D last with one keystroke fewer.
    """
    seen: set[str] = set()
    atoms = _tokenize(text, _label_keys(labels), labels, seen)
    return _complete(_join_ties(atoms, text), labels, seen)


def _tokenize(text: str, by_key: dict, labels: list[str], seen: set[str]) -> list:
    """Text -> a list of atoms (a letter or a "(...)" group, as a list of labels), "=" and ">"."""
    tokens: list = []
    group: list[str] | None = None  # an open "(...)" tie
    for ch in text:
        if ch.isspace() or (group is not None and ch in {",", "="}):
            continue  # spacing never changes the meaning; inside (...) everything is one tie
        if ch in _SEPARATORS and group is None:
            tokens.append(">")
        elif ch == "=" and group is None:
            tokens.append("=")
        elif ch == "(":
            if group is not None:
                raise ValueError(f"Parentheses cannot nest in {text!r}")
            group = []
        elif ch == ")":
            if not group:
                raise ValueError(f"Unmatched or empty parentheses in {text!r}")
            tokens.append(group)
            group = None
        elif ch in _SEPARATORS:
            raise ValueError(f"Unexpected {ch!r} inside parentheses in {text!r}")
        else:
            label = _lookup(ch, by_key, labels, seen)
            if group is None:
                tokens.append([label])
            else:
                group.append(label)
    if group is not None:
        raise ValueError(f"Unclosed '(' in {text!r}")
    return tokens


def _join_ties(tokens: list, text: str) -> list[list[str]]:
    """Atoms become tiers; "=" merges the atoms on its two sides into one tier."""
    tiers: list[list[str]] = []
    previous = ">"  # the start of the text behaves like a separator
    for token in tokens:
        if isinstance(token, list):
            if previous == "=":
                tiers[-1].extend(token)
            else:
                tiers.append(list(token))
        elif previous == "=":
            raise ValueError(f"Unexpected {token!r} after '=' in {text!r}: tie it to a letter")
        elif token == "=" and previous != "atom":
            raise ValueError(f"'=' in {text!r} needs a letter on both sides")
        previous = token if isinstance(token, str) else "atom"
    if previous == "=":
        raise ValueError(f"{text!r} ends with '=': tie it to a letter")
    return tiers


def _label_keys(labels: list[str]) -> dict[str, str]:
    by_key = {}
    for label in labels:
        key = str(label).upper()
        if len(key) != 1 or key in by_key or key in "=()>,":
            raise ValueError(f"Ranking labels must be distinct single characters, got {labels}")
        by_key[key] = label
    return by_key


def _lookup(ch: str, by_key: dict[str, str], labels: list[str], seen: set[str]) -> str:
    label = by_key.get(ch.upper())
    if label is None:
        raise ValueError(f"Unknown response {ch!r}: use {', '.join(map(str, labels))}")
    if label in seen:
        raise ValueError(f"Response {label} is ranked twice")
    seen.add(label)
    return label


def _complete(tiers: list[list[str]], labels: list[str], seen: set[str]) -> list[list[str]]:
    missing = [label for label in labels if label not in seen]
    if len(missing) == 1:
        tiers.append(missing)  # the only one left is, by elimination, the worst
    elif missing:
        raise ValueError(f"Rank every response; missing: {', '.join(map(str, missing))}")
    return tiers


def format_ranking_text(tiers: list[list]) -> str:
    """Inverse of parse_ranking_text: [["B"], ["A","C"], ["D"]] -> "B > A = C > D"."""
    return " > ".join(" = ".join(str(label) for label in tier) for tier in tiers)


def split_for_prompt(prompt_key: str, heldout_fraction: float, salt: str = "rlhf-loop") -> str:
    """Stable "train" / "heldout" assignment of a prompt.

    sha256, not hash(): Python salts str hashes per process, and a prompt that changed sides
    between runs would leak held-out data into training.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    digest = hashlib.sha256((salt + prompt_key).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    return "heldout" if u < heldout_fraction else "train"
