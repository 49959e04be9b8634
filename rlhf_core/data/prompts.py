"""Prompt verbs: how many, those of a split, by id, and the least-labeled for a new batch."""
from __future__ import annotations

import random

from rlhf_core.data.store import Store


def count(store: Store) -> int:
    return store.scalar("SELECT COUNT(*) FROM prompts") or 0


def of_split(store: Store, split: str, limit: int | None = None) -> list[dict]:
    """`{"id", "text"}` of the `split` ("train" or "heldout") prompts, by id."""
    rows = store.rows("SELECT id, text FROM prompts WHERE split = ? ORDER BY id", [split])
    return rows[:limit] if limit else rows


def by_ids(store: Store, ids: list[int]) -> list[dict]:
    ids = [int(i) for i in ids]
    marks = ",".join("?" * len(ids))
    return store.rows(f"SELECT id, text, split FROM prompts WHERE id IN ({marks})", ids)


def least_labeled(store: Store, n: int, *, seed: int, split: str | None = None,
                  exclude_open: bool = True) -> list[dict]:
    """The least-labeled prompts first (random among equals), skipping ones already waiting."""
    sql = """SELECT p.id, p.text, p.split,
                    (SELECT COUNT(*) FROM items i WHERE i.prompt_id = p.id) AS n_items,
                    (SELECT COUNT(*) FROM items i WHERE i.prompt_id = p.id
                       AND i.status = 'ready') AS n_open
             FROM prompts p"""
    params: list = []
    if split:
        sql += " WHERE p.split = ?"
        params.append(split)
    rows = store.rows(sql, params)
    if exclude_open:
        rows = [r for r in rows if r["n_open"] == 0] or rows
    rng = random.Random(seed)
    rng.shuffle(rows)
    rows.sort(key=lambda r: r["n_items"])
    return rows[:n]
