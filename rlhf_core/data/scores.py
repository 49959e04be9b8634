"""Reward-model scores of stored responses (`response_scores`): the researcher view.

The worker scores (once per reward version) the responses of ranked items, newest first
(rlhf_core.reward.round.score_items); the UI only reads the table, it never loads a model.
"""
from __future__ import annotations

from rlhf_core.data.store import Store, now_iso

# Responses of items with an active 'rank' ranking and no score from reward version `?`.
_UNSCORED_SQL = """
    FROM responses s JOIN prompts p ON p.id = s.prompt_id
    WHERE s.item_id IN (SELECT item_id FROM active_rankings WHERE kind = 'rank')
      AND NOT EXISTS (SELECT 1 FROM response_scores x
                      WHERE x.response_id = s.id AND x.reward_version = ?)
"""


def unscored_count(store: Store, reward_version: int) -> int:
    return store.scalar("SELECT COUNT(*) " + _UNSCORED_SQL, [reward_version]) or 0


def unscored_responses(store: Store, reward_version: int, limit: int) -> list[dict]:
    """Newest items first, so the researcher view's recent items are scored before old ones."""
    return store.rows("SELECT s.id, s.item_id, s.text, p.text AS prompt " + _UNSCORED_SQL
                      + " ORDER BY s.item_id DESC, s.position LIMIT ?", [reward_version, limit])


def save_scores(store: Store, reward_version: int, scores: dict[int, float]) -> int:
    """Insert {response_id: score}; an existing (response, version) score is kept."""
    at = now_iso()
    with store.write() as db:
        added = 0
        for response_id, score in scores.items():
            cur = db.execute("INSERT INTO response_scores (response_id, reward_version, score, "
                             "created_at) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                             [int(response_id), int(reward_version), float(score), at])
            added += cur.rowcount
    return added
