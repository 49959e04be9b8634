"""The dashboard's and the researcher view's data as plain functions (no Gradio, no torch).

Everything reads `rlhf_core.data.reports` (read-only queries) and returns pandas DataFrames in long
form (x, value, series) for Gradio's native plots, display tables whose cells are already
formatted strings, or plain dicts. An empty workspace gives empty frames and a note saying why.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd

from rlhf_core.data import reports
from rlhf_core.data.annotation import LABELS
from rlhf_core.data.store import Store, loads
from rlhf_core.worker.loop import gather_state
from rlhf_core.workspace import read_config

PPO_PLOTS = {"reward_mean": "reward (mean score)", "kl": "KL from reference (per sequence)",
             "entropy": "entropy (per token)", "response_length": "response length (tokens)"}
# Metric names under which a KL from the reference may be recorded (as in rlhf_core.data.reports).


def fmt(x, digits: int = 3) -> str:
    """A table cell: floats rounded, None as an empty string."""
    if x is None or (isinstance(x, float) and x != x):
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def long_frame(rows: list[dict], x: str, series: dict[str, str]) -> pd.DataFrame:
    """rows with column x and the keys of `series` -> (x, value, series) rows, Nones dropped."""
    out = [{x: r[x], "value": float(r[k]), "series": label}
           for r in rows for k, label in series.items() if r.get(k) is not None]
    return pd.DataFrame(out, columns=[x, "value", "series"])


def by_version(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer versions -> labels "v0", "v1", ... (a categorical axis: no "v1.5" ticks)."""
    frame["version"] = [f"v{int(v)}" for v in frame["version"]]
    return frame


def version_order(frame: pd.DataFrame) -> list[str]:
    """The x order of a by_version frame: numeric, so v10 comes after v9."""
    return sorted(set(frame["version"]), key=lambda label: int(label[1:]))


def fingerprint(store: Store) -> tuple:
    """Changes whenever anything a plot shows changes (cheap: a few MAX(id) lookups)."""
    return reports.change_fingerprint(store)


# -- dashboard ---------------------------------------------------------------------------------
def pick_bucket(store: Store) -> int:
    """Bucket seconds so that the ranking history has at most a few hundred points."""
    first, last = reports.ranking_span(store)
    if not first:
        return 60
    span = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    return next((b for b in (60, 300, 900, 3600, 21600) if span / b <= 300), 86400)


def rankings_frame(store: Store, bucket_s: int | None = None) -> pd.DataFrame:
    bucket_s = bucket_s or pick_bucket(store)
    rows = reports.rankings_over_time(store, bucket_s)
    for r in rows:
        r["time"] = datetime.fromtimestamp(r["t"], timezone.utc).replace(tzinfo=None)
    frame = long_frame(rows, "time", {"total": "rankings standing (total)",
                                      "rankings": f"new rankings per {bucket_s // 60} min",
                                      "skips": f"skips per {bucket_s // 60} min"})
    frame["time"] = pd.to_datetime(frame["time"])
    return frame


def reward_frames(store: Store) -> dict:
    """Accuracy per reward version (held-out and fresh) and the accuracy-history table."""
    series = reports.reward_series(store)
    reasons = {v["version"]: v["reason"] for v in store.list_versions("reward")}
    acc = by_version(long_frame(series, "version", {
        "heldout_accuracy": "held-out accuracy", "fresh_accuracy": "fresh accuracy (newest labels)"}))
    table = pd.DataFrame([{
        "version": f"v{r['version']}", "status": r["status"],
        "held-out": fmt(r.get("heldout_accuracy")), "fresh": fmt(r.get("fresh_accuracy")),
        "ECE": fmt(r.get("heldout_ece")), "pairs": fmt(r.get("counts.train_pairs")),
        "reason": fmt(reasons.get(r["version"]))}
        for r in reversed(series)])
    return {"reward_acc": acc, "reward_table": table}


def ppo_frames(store: Store) -> dict[str, pd.DataFrame]:
    """One (step, value, version) frame per PPO metric; steps run on across rounds."""
    rows = reports.ppo_series(store)
    out = {}
    for name in PPO_PLOTS:
        out[name] = pd.DataFrame(
            [{"step": r["step"], "value": float(r[name]), "version": f"v{r['version']}"}
             for r in rows if r.get(name) is not None and r.get("step") is not None],
            columns=["step", "value", "version"])
    return out


def ab_frames(report: dict) -> dict:
    """Win rate vs the baseline per version (table + plot of rate and interval) and the
    Bradley-Terry leaderboard."""
    rates = report["win_rates"]
    table = pd.DataFrame([{
        "version": f"v{r['version']}", "win rate": fmt(r["rate"]),
        "95% interval": f"{fmt(r['lo'])} – {fmt(r['hi'])}" if r["rate"] is not None else "",
        "wins": r["wins"], "ties": r["ties"], "losses": r["losses"], "pairs": r["n"]}
        for r in rates], columns=["version", "win rate", "95% interval", "wins", "ties",
                                  "losses", "pairs"])
    plot = by_version(long_frame(rates, "version", {"hi": "95% upper", "rate": "win rate",
                                                    "lo": "95% lower"}))
    board = pd.DataFrame([{
        "rank": i + 1, "version": f"v{r['version']}", "rating": fmt(r["rating"], 0),
        "95% interval": f"{fmt(r['lo'], 0)} – {fmt(r['hi'], 0)}" if r["lo"] is not None else "",
        "comparisons": r["n"]} for i, r in enumerate(report["leaderboard"])],
        columns=["rank", "version", "rating", "95% interval", "comparisons"])
    return {"ab_table": table, "ab_plot": plot, "leaderboard": board}


def policy_kl(store: Store) -> dict[int, float]:
    """KL from the reference per policy version: recorded with the version, else its last
    PPO step's. The reference (v0) is 0 by definition."""
    rows = reports.ppo_series(store)
    out = {0: 0.0}
    for v in store.list_versions("policy"):
        kl = reports.kl_from(v["metrics"], [r for r in rows if r["version"] == v["version"]])
        if kl is not None:
            out[v["version"]] = float(kl)
    return out


def version_health_frames(store: Store, report: dict) -> dict:
    """Per policy version, side by side: win rate and diversity (0..1), and drift (KL, length).
    Reward hacking shows as KL/length rising while diversity falls and win rate stalls."""
    diversity = reports.diversity_report(store, max_responses=200)
    rates = {r["version"]: r["rate"] for r in report["win_rates"]}
    kl = policy_kl(store)
    rows = [{**d, "win_rate": rates.get(d["version"]), "kl": kl.get(d["version"])}
            for d in diversity]
    quality = by_version(long_frame(rows, "version", {
        "win_rate": "win rate vs reference", "distinct_1": "distinct-1",
        "distinct_2": "distinct-2", "same_opening_share": "same-opening share"}))
    drift = by_version(long_frame(rows, "version", {"kl": "KL from reference",
                                                    "mean_tokens": "mean length (tokens)"}))
    table = pd.DataFrame([{
        "version": f"v{r['version']}", "responses": r["count"],
        "distinct-1": fmt(r["distinct_1"]), "distinct-2": fmt(r["distinct_2"]),
        "same opening": fmt(r["same_opening_share"]), "mean tokens": fmt(r["mean_tokens"], 1),
        "stop rate": fmt(r["stop_rate"]), "KL": fmt(r["kl"]), "win rate": fmt(r["win_rate"])}
        for r in rows])
    return {"quality": quality, "drift": drift, "diversity_table": table}


def agreement_text(report: dict) -> str:
    if not report["n_items"]:
        return ("No item has been ranked by two annotators yet (set `loop.overlap` above 1 to "
                "measure agreement).")
    return (f"**{report['n_items']}** items ranked by two or more of **{report['n_annotators']}**"
            f" annotators ({report['n_comparisons']} comparisons): pairwise agreement "
            f"**{fmt(report['pairwise_agreement'], 2)}**, Kendall's tau-b "
            f"**{fmt(report['kendall_tau'], 2)}**.")


EMPTY = {"rankings": "No rankings yet.", "reward_acc": "No reward-model versions yet.",
         "ppo": "No PPO rounds yet.", "ab": "No blind A/B rankings yet: win rates appear once "
         "items mixing a policy with the reference are ranked.",
         "health": "No responses sampled yet."}


def dashboard_data(store: Store, *, bootstrap_rounds: int = 50) -> dict:
    """Everything the Dashboard tab plots, plus a note per section ('' when it has data)."""
    report = reports.ab_report(store, baseline=0, rounds=bootstrap_rounds)
    out = {"rankings": rankings_frame(store), **reward_frames(store), **ab_frames(report),
           **{f"ppo_{k}": v for k, v in ppo_frames(store).items()},
           **version_health_frames(store, report),
           "agreement_md": agreement_text(reports.agreement_report(store)),
           "ab_summary": (f"{report['n_rankings']} rankings of {report['n_items']} mixed items "
                          f"give {report['n_comparisons']} cross-version pairs (pairs of one "
                          "ranking are correlated: read intervals with the ranking count).")}
    has_ppo = any(not out[f"ppo_{k}"].empty for k in PPO_PLOTS)
    out["notes"] = {"rankings": "" if not out["rankings"].empty else EMPTY["rankings"],
                    "reward_acc": "" if len(out["reward_table"]) else EMPTY["reward_acc"],
                    "ppo": "" if has_ppo else EMPTY["ppo"],
                    "ab": "" if len(out["ab_table"]) else EMPTY["ab"],
                    "health": "" if len(out["diversity_table"]) else EMPTY["health"]}
    return out


# -- researcher view ------------------------------------------------------------------------------
def recent_items(store: Store, *, limit: int = 20, reward_version: int | None = None,
                 flagged_only: bool = False) -> dict:
    """The newest submitted rankings, each with its responses in the annotator's order, their
    reward scores (version `reward_version`, default: promoted) and whether the reward model
    orders the strict pairs as the annotator did."""
    if reward_version is None:
        cur = store.current_version("reward")
        reward_version = cur["version"] if cur else None
    rankings = reports.recent_rankings(store, limit=limit, flagged_only=flagged_only)
    items = [scored_item(store, r, reward_version) for r in rankings]
    return {"reward_version": reward_version, "items": items}


def scored_item(store: Store, ranking: dict, reward_version: int | None) -> dict:
    responses = reports.item_responses_with_scores(store, ranking["item_id"], reward_version)
    tier_of = {rid: t for t, tier in enumerate(loads(ranking["tiers"], [])) for rid in tier}
    for r in responses:
        r["label"] = LABELS[r["position"]] if r["position"] < len(LABELS) else str(r["position"])
        r["tier"] = tier_of.get(r["id"])
    responses.sort(key=lambda r: (r["tier"] is None, r["tier"] or 0, r["position"]))
    agree, n = reward_agreement(responses)
    return {**{k: ranking[k] for k in ("id", "item_id", "annotator", "flagged", "all_bad", "note",
                                       "created_at", "kind", "selection", "policy_version",
                                       "prompt", "time_spent_s")},
            "responses": responses, "agree": agree, "pairs": n}


def reward_agreement(responses: list[dict]) -> tuple[int, int]:
    """(agreeing, scored strict pairs): pairs in different tiers, both scored; the reward model
    agrees when the better-ranked response has the higher score."""
    placed = [r for r in responses if r["tier"] is not None and r.get("score") is not None]
    agree = n = 0
    for i, a in enumerate(placed):
        for b in placed[i + 1:]:
            if a["tier"] == b["tier"]:
                continue
            better, worse = (a, b) if a["tier"] < b["tier"] else (b, a)
            n += 1
            agree += better["score"] > worse["score"]
    return agree, n


def version_choices(store: Store) -> list[tuple[str, str]]:
    """Dropdown choices (label, "kind:version"), newest first."""
    out = []
    for kind in ("policy", "reward"):
        for v in reversed(store.list_versions(kind)):
            label = f"{kind} v{v['version']} · {v['status']}"
            out.append((label + (" (reference)" if kind == "policy" and v["version"] == 0
                                 else ""), f"{kind}:{v['version']}"))
    return out


def loop_settings(store: Store) -> dict:
    """The automatic loop's switch, thresholds and where it stands now."""
    cfg = read_config(store)
    state = gather_state(store, cfg)
    return {"auto": cfg.loop.auto, "retrain_every": cfg.loop.retrain_every,
            "rankings_since_training": state.rankings - state.rankings_at_last_training,
            "min_ready_items": cfg.sampling.min_ready_items, "open_items": state.open_items,
            "reward_version": state.reward_version, "reward_used_by_ppo": state.reward_used_by_ppo,
            "policy_version": state.policy_version, "ab_fraction": cfg.loop.ab_fraction,
            "ab_baseline": cfg.loop.ab_baseline, "selection": cfg.loop.selection,
            "random_share": cfg.loop.random_share, "retire_rule": cfg.loop.retire_rule,
            "overlap": cfg.loop.overlap, "promote_tolerance": cfg.reward.promote_tolerance,
            "kl_coef": cfg.ppo.kl_coef, "active_jobs": sorted(state.active_jobs)}
