"""Read-only queries over the store that feed `rlhf_core.evaluation`.

Each report returns plain dicts/lists (JSON-ready) for the dashboard, the CLI and the simulator.
Nothing here writes, loads a model or imports torch; an empty workspace gives empty reports.

Which rankings count: active ones (not undone), of kind 'rank', not flagged. Rankings marked
"all bad" still order the responses, so they count for win rates and agreement (they are left
out of the reward model's training pairs only).
"""
from __future__ import annotations

import statistics
from datetime import datetime, timezone

from rlhf_core import evaluation as ev
from rlhf_core.data.store import Store, loads

# Items whose responses come from several policy versions: the blind A/B items, and any
# other item that happens to mix versions.
_MIXED_ITEMS_SQL = """
    SELECT i.id FROM items i WHERE i.kind = 'ab'
       OR (SELECT COUNT(DISTINCT s.policy_version) FROM responses s WHERE s.item_id = i.id) > 1
"""
_COUNTED_RANKINGS_SQL = """
    SELECT r.id, r.item_id, r.annotator, r.tiers, r.created_at FROM active_rankings r
    WHERE r.kind = 'rank' AND r.flagged = 0 AND r.tiers IS NOT NULL
"""
# Metric names under which a KL from the reference may be recorded, most specific first.


# -- blind A/B: win rates and the leaderboard ----------------------------------------
def ab_outcomes(store: Store) -> dict:
    """Cross-version outcomes from every counted ranking of a mixed-version item.

    Returns {"outcomes": [(version_a, version_b, score)], "rankings": [the ranking id of each
    outcome], "n_rankings", "n_items"}.
    """
    rankings = store.rows(_COUNTED_RANKINGS_SQL + f" AND r.item_id IN ({_MIXED_ITEMS_SQL}) "
                          "ORDER BY r.id")
    version_of = {r["id"]: r["policy_version"] for r in store.rows(
        f"SELECT id, policy_version FROM responses WHERE item_id IN ({_MIXED_ITEMS_SQL})")}
    outcomes, ranking_ids = [], []
    for r in rankings:
        these = ev.pairwise_outcomes(loads(r["tiers"], []), version_of)
        outcomes.extend(these)
        ranking_ids.extend([r["id"]] * len(these))
    return {"outcomes": outcomes, "rankings": ranking_ids, "n_rankings": len(rankings),
            "n_items": len({r["item_id"] for r in rankings})}


def ab_report(store: Store, baseline: int = 0, *, rounds: int = 100, seed: int = 0,
              z: float = 1.96) -> dict:
    """Human win rate of each version vs `baseline` (Wilson interval, ties = half) and a
    Bradley-Terry leaderboard anchored at the baseline = 1000 with bootstrap intervals.

    n counts response pairs; the pairs of one ranking are correlated, so each row also counts
    `rankings` (the independent judgements it rests on), and the bootstrap resamples whole
    rankings.
    """
    data = ab_outcomes(store)
    outcomes, ranking_ids = data["outcomes"], data["rankings"]
    rates = ev.ab_win_rates(outcomes, baseline, z=z)
    ratings = ev.bradley_terry_ratings(outcomes, anchor=baseline)
    intervals = ev.bootstrap_ratings(outcomes, rounds=rounds, seed=seed, anchor=baseline,
                                     groups=ranking_ids)
    games = {v: sum(v in (a, b) for a, b, _ in outcomes) for v in ratings}
    judged: dict = {}  # version -> rankings that compared it (with anyone / with the baseline)
    for (a, b, _), rid in zip(outcomes, ranking_ids):
        for v in (a, b):
            judged.setdefault((v, "any"), set()).add(rid)
            if baseline in (a, b) and v != baseline:
                judged.setdefault((v, "baseline"), set()).add(rid)
    leaderboard = []
    for v in sorted(ratings, key=lambda v: -ratings[v]):
        lo, hi = intervals.get(v, (None, None))
        leaderboard.append({"version": v, "rating": ratings[v], "lo": lo, "hi": hi,
                            "n": games[v], "rankings": len(judged.get((v, "any"), ()))})
    return {"baseline": baseline, "n_rankings": data["n_rankings"], "n_items": data["n_items"],
            "n_comparisons": len(outcomes),
            "win_rates": [{"version": v, **rates[v],
                           "rankings": len(judged.get((v, "baseline"), ()))} for v in rates],
            "leaderboard": leaderboard}


# -- diversity ---------------------------------------------------------------------------
def diversity_report(store: Store, *, k_words: int = 3,
                     max_responses: int | None = None) -> list[dict]:
    """Per policy version: distinct-1/2, same-opening share, mean length (with its standard
    deviation `sd_tokens` over `n_tokens` responses), stop rate, count.

    distinct-n falls as a batch grows, so compare versions on similar counts: `max_responses`
    keeps only each version's newest N responses.
    """
    by_version: dict = {}
    for r in store.rows("SELECT policy_version, text, n_tokens, finish_reason FROM responses "
                        "ORDER BY policy_version, id DESC"):
        by_version.setdefault(r["policy_version"], []).append(r)
    report = []
    for version, rows in sorted(by_version.items()):
        rows = rows[:max_responses] if max_responses else rows
        texts = [r["text"] for r in rows]
        lengths = [r["n_tokens"] for r in rows if r["n_tokens"] is not None]
        finished = [r["finish_reason"] for r in rows if r["finish_reason"] is not None]
        report.append({
            "version": version, "count": len(rows),
            "distinct_1": ev.distinct_n(texts, 1), "distinct_2": ev.distinct_n(texts, 2),
            "same_opening_share": ev.same_opening_share(texts, k_words),
            "mean_tokens": sum(lengths) / len(lengths) if lengths else None,
            "sd_tokens": statistics.stdev(lengths) if len(lengths) > 1 else None,
            "n_tokens": len(lengths),
            "stop_rate": (sum(f == "stop" for f in finished) / len(finished)
                          if finished else None)})
    return report


# -- annotator agreement ------------------------------------------------------------------
def agreement_report(store: Store) -> dict:
    """Agreement on items ranked by two or more annotators (each annotator's latest ranking)."""
    by_item: dict = {}
    for r in store.rows(_COUNTED_RANKINGS_SQL + " ORDER BY r.id"):
        by_item.setdefault(r["item_id"], {})[r["annotator"]] = loads(r["tiers"], [])
    shared = {item: by_annotator for item, by_annotator in by_item.items()
              if len(by_annotator) >= 2}
    out = ev.agreement({item: list(by_annotator.values())
                        for item, by_annotator in shared.items()})
    out["n_annotators"] = len({a for by_annotator in shared.values() for a in by_annotator})
    return out


# -- rankings over time ---------------------------------------------------------------------
def rankings_over_time(store: Store, bucket_s: int = 60) -> list[dict]:
    """Ranking activity per time bucket, gaps filled with zeros (see `bucket_rankings`)."""
    rows = store.rows("SELECT r.kind, r.created_at, r.annotator, s.kind AS undone_kind "
                      "FROM rankings r LEFT JOIN rankings s ON s.id = r.supersedes ORDER BY r.id")
    return bucket_rankings(rows, bucket_s)


def bucket_rankings(rows: list[dict], bucket_s: int = 60, max_buckets: int = 10000) -> list[dict]:
    """rows {kind, created_at (ISO), annotator?, undone_kind?} -> one dict per bucket.

    Each bucket: t (epoch start), time (ISO), rankings, skips, undos, annotators (distinct),
    and `total`: rankings still standing so far (a 'rank' adds one, an undo of a 'rank'
    removes one). Empty buckets between the first and last are filled unless that would
    exceed `max_buckets`.
    """
    bucket_s = max(1, int(bucket_s))
    buckets: dict = {}
    for r in rows:
        t = _epoch(r["created_at"]) // bucket_s * bucket_s
        b = buckets.setdefault(t, {"rankings": 0, "skips": 0, "undos": 0, "net": 0,
                                   "who": set()})
        kind = r["kind"]
        b[{"rank": "rankings", "skip": "skips", "undo": "undos"}[kind]] += 1
        b["net"] += 1 if kind == "rank" else -1 if r.get("undone_kind") == "rank" else 0
        if r.get("annotator"):
            b["who"].add(r["annotator"])
    if not buckets:
        return []
    first, last = min(buckets), max(buckets)
    steps = range(int(first), int(last) + 1, bucket_s)
    times = steps if len(steps) <= max_buckets else sorted(buckets)
    out, total = [], 0
    for t in times:
        b = buckets.get(t) or {"rankings": 0, "skips": 0, "undos": 0, "net": 0, "who": set()}
        total += b["net"]
        out.append({"t": t, "time": datetime.fromtimestamp(t, timezone.utc).isoformat(),
                    "rankings": b["rankings"], "skips": b["skips"], "undos": b["undos"],
                    "annotators": len(b["who"]), "total": total})
    return out


def _epoch(iso: str) -> int:
    dt = datetime.fromisoformat(iso)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


# -- training curves ------------------------------------------------------------------------
def ppo_series(store: Store, kind: str = "ppo", version: int | None = None) -> list[dict]:
    """Metrics of `kind` pivoted to one dict per (version, step): {version, step, name: value}.

    Whatever names were logged appear as keys (reward_mean, kl, entropy, response_length, ...);
    a name logged twice for the same step keeps its latest value.
    """
    sql, params = "SELECT version, step, name, value FROM metrics WHERE kind = ?", [kind]
    if version is not None:
        sql, params = sql + " AND version = ?", params + [version]
    rows: dict = {}
    for m in store.rows(sql + " ORDER BY id", params):
        key = (m["version"], m["step"])
        rows.setdefault(key, {"version": m["version"], "step": m["step"]})[m["name"]] = m["value"]
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0] is None, k[0] or 0,
                                                           k[1] is None, k[1] or 0))]


def reward_series(store: Store) -> list[dict]:
    """One flat dict per reward version: version, status, parent, created_at, then every
    scalar in versions.metrics (nested keys joined with '.'), `counts.*`, and the step-less
    metrics rows of kind 'reward' / 'reward_eval' (e.g. a fresh accuracy measured later)."""
    later: dict = {}
    for m in store.rows("SELECT version, name, value FROM metrics WHERE step IS NULL "
                        "AND kind IN ('reward', 'reward_eval') ORDER BY id"):
        later.setdefault(m["version"], {})[m["name"]] = m["value"]
    out = []
    for v in store.list_versions("reward"):
        row = {"version": v["version"], "status": v["status"], "parent": v["parent"],
               "created_at": v["created_at"]}
        extra = {**flatten(v["metrics"]), **later.get(v["version"], {}),
                 **flatten(v["counts"], "counts.")}
        row.update({k: x for k, x in extra.items() if k not in row})
        out.append(row)
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, x in (d or {}).items():
        if isinstance(x, dict):
            flat.update(flatten(x, f"{prefix}{k}."))
        elif x is None or isinstance(x, (int, float, str, bool)):
            flat[f"{prefix}{k}"] = x
    return flat


# -- provenance --------------------------------------------------------------------------------
def version_page(store: Store, kind: str, version: int, *, max_rankings: int = 200) -> dict | None:
    """Where a version came from and what it produced; None when it does not exist."""
    v = store.get_version(kind, version)
    if v is None:
        return None
    page = {k: v.get(k) for k in ("kind", "version", "status", "parent", "reward_version",
                                   "path", "base_model", "reason", "job_id", "created_at",
                                   "config", "counts", "metrics")}
    page["children"] = [c["version"] for c in store.rows(
        "SELECT version FROM versions WHERE kind = ? AND parent = ? ORDER BY version",
        [kind, version])]
    if kind == "reward":
        page["policies_trained"] = [p["version"] for p in store.rows(
            "SELECT version FROM versions WHERE kind = 'policy' AND reward_version = ? "
            "ORDER BY version", [version])]
        return page
    page["ppo"] = ppo_series(store, version=version)
    page["kl_from_reference"] = kl_from(page["metrics"], page["ppo"])
    page["batches"] = _batches_of(store, version)
    page["rankings"] = _rankings_of(store, version, max_rankings)
    rates = ev.ab_win_rates(ab_outcomes(store)["outcomes"], 0) if version != 0 else {}
    page["win_rate_vs_reference"] = rates.get(version)
    return page


def kl_from(metrics: dict, ppo_rows: list[dict]):
    """The KL from the reference recorded with the version (policy rounds write `kl`), else
    the last PPO step's."""
    if isinstance(metrics.get("kl"), (int, float)):
        return metrics["kl"]
    return next((row["kl"] for row in reversed(ppo_rows) if row.get("kl") is not None), None)


def _batches_of(store: Store, version: int) -> list[dict]:
    return store.rows("""
        SELECT b.id, b.created_at, b.k, b.job_id,
               (SELECT COUNT(*) FROM items i WHERE i.batch_id = b.id) AS items,
               (SELECT COUNT(*) FROM items i WHERE i.batch_id = b.id AND i.kind = 'ab') AS ab_items,
               (SELECT COUNT(*) FROM items i WHERE i.batch_id = b.id AND i.status = 'ready')
                   AS items_ready,
               (SELECT COUNT(*) FROM active_rankings r WHERE r.batch_id = b.id
                   AND r.kind = 'rank') AS rankings,
               (SELECT COUNT(*) FROM active_rankings r WHERE r.batch_id = b.id
                   AND r.kind = 'skip') AS skips
        FROM batches b WHERE b.policy_version = ? ORDER BY b.id""", [version])


def _rankings_of(store: Store, version: int, limit: int) -> list[dict]:
    rows = store.rows("""
        SELECT r.id, r.annotator, r.item_id, r.batch_id, r.kind, r.tiers, r.all_bad, r.flagged,
               r.time_spent_s, r.created_at,
               NOT EXISTS (SELECT 1 FROM rankings u WHERE u.supersedes = r.id) AS active
        FROM rankings r JOIN batches b ON b.id = r.batch_id
        WHERE b.policy_version = ? AND r.kind != 'undo' ORDER BY r.id DESC LIMIT ?""",
                      [version, limit])
    for r in rows:
        r["tiers"] = loads(r["tiers"])
        r["active"] = bool(r["active"])
    return rows


def reward_history(store: Store) -> list[dict]:
    """Per reward version, oldest first: what the UI's accuracy-history table shows."""
    out = []
    for v in store.list_versions("reward"):
        m, c = v["metrics"], v["counts"]
        out.append({
            "version": v["version"], "status": v["status"], "reason": v["reason"],
            "created_at": v["created_at"], "parent": v["parent"],
            "heldout_accuracy": m.get("heldout_accuracy"), "heldout_loss": m.get("heldout_loss"),
            "fresh_accuracy": m.get("fresh_accuracy"),
            "fresh_accuracy_before": m.get("current_fresh_accuracy"),  # the serving version's
            "mean_p_chosen": m.get("heldout_mean_p_chosen"),
            "observed_p_chosen": m.get("heldout_observed_p_chosen"),
            "ece": m.get("heldout_ece"),
            "train_pairs": c.get("train_pairs"), "new_pairs": c.get("new_pairs"),
            "heldout_pairs": c.get("heldout_pairs"), "fresh_pairs": c.get("fresh_pairs"),
        })
    return out


def change_fingerprint(store: Store) -> tuple:
    """Changes whenever anything a dashboard plot shows changes (a few MAX(id) lookups)."""
    return tuple(store.scalar(f"SELECT COALESCE(MAX(id), 0) FROM {t}")
                 for t in ("rankings", "metrics", "versions", "responses", "response_scores"))


def ranking_span(store: Store) -> tuple[str | None, str | None]:
    """ISO times of the first and the last ranking (None, None without any)."""
    row = store.one("SELECT MIN(created_at) AS first, MAX(created_at) AS last FROM rankings")
    return (row["first"], row["last"]) if row else (None, None)


def recent_rankings(store: Store, *, limit: int, flagged_only: bool = False) -> list[dict]:
    """The newest active 'rank' rankings with their item, batch and prompt (newest first);
    `flagged_only`: those flagged or with a note."""
    where = "r.kind = 'rank'" + (" AND (r.flagged = 1 OR COALESCE(r.note, '') != '')"
                                 if flagged_only else "")
    return store.rows(f"""
        SELECT r.id, r.item_id, r.annotator, r.tiers, r.flagged, r.all_bad, r.note,
               r.created_at, r.time_spent_s, i.kind, i.selection, b.policy_version,
               p.text AS prompt
        FROM active_rankings r JOIN items i ON i.id = r.item_id
        JOIN batches b ON b.id = i.batch_id JOIN prompts p ON p.id = i.prompt_id
        WHERE {where} ORDER BY r.id DESC LIMIT ?""", [limit])


def item_responses_with_scores(store: Store, item_id: int,
                               reward_version: int | None) -> list[dict]:
    """An item's responses by position, each with its score from `reward_version` (or None)."""
    return store.rows(
        "SELECT s.id, s.position, s.policy_version, s.text, s.n_tokens, x.score "
        "FROM responses s LEFT JOIN response_scores x ON x.response_id = s.id "
        "AND x.reward_version = ? WHERE s.item_id = ? ORDER BY s.position",
        [reward_version if reward_version is not None else -1, item_id])
