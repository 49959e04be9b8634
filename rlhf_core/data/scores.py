"""The `score_items` job: score ranked responses with the serving reward version.

The researcher view shows each submitted item's reward scores beside the annotator's order, so
the worker scores (once per reward version) the responses of recently ranked items and stores
them in `response_scores`. The UI only reads that table; it never loads a model.

The SQL helpers here import no torch, so `rlhf_core.worker.loop` can ask whether scoring is due.
"""
from __future__ import annotations

from rlhf_core.data.jobs import handler
from rlhf_core.data.store import Store, now_iso

DEFAULT_LIMIT = 256  # responses per job: a few seconds on the embedded model
CHUNK = 32  # responses per score_texts call, one progress report each

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


@handler("score_items")
def score_items_job(runtime, params: dict, reporter) -> dict:
    """params: {"version"?: reward version (default: promoted), "limit"?: max responses}."""
    from rlhf_core.reward.round import load_reward  # torch: only inside the worker
    scorer = load_reward(runtime, (params or {}).get("version"))
    store, version = runtime.store, scorer.version
    rows = unscored_responses(store, version, int((params or {}).get("limit") or DEFAULT_LIMIT))
    added = 0
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        scores = scorer.score_texts([r["prompt"] for r in chunk], [r["text"] for r in chunk])
        added += save_scores(store, version, {r["id"]: s for r, s in zip(chunk, scores)})
        reporter.progress((start + len(chunk)) / len(rows),
                          f"scored {start + len(chunk)}/{len(rows)} responses with reward "
                          f"v{version}")
    left = unscored_count(store, version)
    reporter.progress(1.0, f"reward v{version}: {added} responses scored, {left} left")
    return {"version": version, "scored": added, "remaining": left}
