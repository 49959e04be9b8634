"""Scripted preferences for simulated annotators and AI-judge pre-labeling.

An oracle is `(prompt: str, responses: list[str]) -> tiers`, tiers being lists
of response indices, best first (ties share a tier). Built-ins:
  shorter            fewer words is better (equal lengths tie)
  longer             more words is better
  contains:WORD      responses containing WORD beat the rest, shorter first within each
  mentions:WORD      responses containing WORD beat the rest, no other preference (ties): a
                     content-only signal, where contains:WORD's length order dominates
  language:CODE      more stop-words of that language (en, fr, es, de) is better
  module:function    any importable callable with the signature above
"""
from __future__ import annotations

import importlib
import random
import re
from typing import Callable

Oracle = Callable[[str, list[str]], list[list[int]]]

STOPWORDS = {
    "en": "the and is are of to in it that you for with this on be as not",
    "fr": "le la les et est sont de des du un une que qui pour avec dans pas vous je",
    "es": "el la los las y es son de del un una que para con en no por se",
    "de": "der die das und ist sind von zu den ein eine nicht mit für ich sie es",
}


def tiers_by_key(keys: list, *, reverse: bool = False) -> list[list[int]]:
    """Group indices by key; the best (smallest, or largest with reverse) first."""
    order = sorted(set(keys), reverse=reverse)
    return [[i for i, k in enumerate(keys) if k == value] for value in order]


def shorter(prompt: str, responses: list[str]) -> list[list[int]]:
    return tiers_by_key([len(r.split()) for r in responses])


def longer(prompt: str, responses: list[str]) -> list[list[int]]:
    return tiers_by_key([len(r.split()) for r in responses], reverse=True)


def contains(word: str) -> Oracle:
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)

    def oracle(prompt: str, responses: list[str]) -> list[list[int]]:
        return tiers_by_key([(0 if pattern.search(r) else 1, len(r.split())) for r in responses])
    return oracle


def mentions(word: str) -> Oracle:
    """WORD or not, nothing else: two tiers at most (in contains:WORD the shorter-first order
    within each tier gives most of a ranking's pairs, so a model learns length from it)."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)

    def oracle(prompt: str, responses: list[str]) -> list[list[int]]:
        return tiers_by_key([0 if pattern.search(r) else 1 for r in responses])
    return oracle


def language(code: str) -> Oracle:
    if code not in STOPWORDS:
        raise ValueError(f"unknown language {code!r}: choose one of {', '.join(STOPWORDS)}")
    words = set(STOPWORDS[code].split())

    def oracle(prompt: str, responses: list[str]) -> list[list[int]]:
        def share(text):
            toks = re.findall(r"\w+", text.lower())
            return round(sum(t in words for t in toks) / max(1, len(toks)), 2)
        return tiers_by_key([share(r) for r in responses], reverse=True)
    return oracle


def load_oracle(spec: str) -> Oracle:
    """Resolve a built-in name, `name:arg`, or `module:function`."""
    if spec == "shorter":
        return shorter
    if spec == "longer":
        return longer
    if spec.startswith("contains:"):
        return contains(spec.split(":", 1)[1])
    if spec.startswith("mentions:"):
        return mentions(spec.split(":", 1)[1])
    if spec.startswith("language:"):
        return language(spec.split(":", 1)[1])
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load oracle {spec!r}: {exc}") from None
        if not callable(fn):
            raise ValueError(f"oracle {spec!r} is not callable")
        return fn
    raise ValueError(f"unknown oracle {spec!r}: use shorter, longer, contains:WORD, "
                     "mentions:WORD, language:CODE or module:function")


def check_tiers(tiers, n: int) -> list[list[int]]:
    """An oracle's answer must rank every response index exactly once."""
    try:
        flat = [int(i) for tier in tiers for i in tier]
    except (TypeError, ValueError):
        raise ValueError(f"oracle returned {tiers!r}: expected a list of lists of indices") from None
    if sorted(flat) != list(range(n)) or any(len(t) == 0 for t in tiers):
        raise ValueError(f"oracle returned {tiers!r}: every index 0..{n - 1} exactly once")
    return [[int(i) for i in tier] for tier in tiers]


def noisy(tiers: list[list[int]], noise: float, rng: random.Random) -> list[list[int]]:
    """With probability `noise`, replace the ranking by a random strict order."""
    if noise <= 0 or rng.random() >= noise:
        return tiers
    flat = [i for t in tiers for i in t]
    rng.shuffle(flat)
    return [[i] for i in flat]


def compare(oracle: Oracle, prompt: str, a: str, b: str) -> float:
    """1.0 if the oracle prefers a, 0.5 for a tie, 0.0 if it prefers b."""
    tiers = check_tiers(oracle(prompt, [a, b]), 2)
    if len(tiers) == 1:
        return 0.5
    return 1.0 if tiers[0] == [0] else 0.0
