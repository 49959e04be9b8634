"""The dashboard's and the researcher view's data as plain functions (no Gradio, no torch).

Everything reads `rlhf_core.data.reports` (read-only queries) and returns pandas DataFrames in long
form (x, value, series, and lo/hi: a 95% interval where one is measured, else None) that
app.charts draws, display tables whose cells are already formatted strings, or plain dicts. An
empty workspace gives empty frames and a note saying why; too little data for an interval says
"not enough data yet" rather than showing a zero-width one.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone

import pandas as pd

from rlhf_core import evaluation as ev
from rlhf_core.data import reports
from rlhf_core.data.annotation import shown_order
from rlhf_core.data.store import Store, loads
from rlhf_core.worker.loop import gather_state
from rlhf_core.workspace import read_config

PPO_PLOTS = {"reward_mean": "reward (mean score)", "kl": "KL from reference (per sequence)",
             "entropy": "entropy (per token)", "response_length": "response length (tokens)"}
# A PPO metric logged once per round gets a 95% interval of its mean from these, when logged.
PPO_SPREAD = {"reward_mean": "reward_std", "kl": "kl_std", "response_length": "response_length_std"}
Z = 1.96  # 95% intervals throughout
# Fewer blind A/B rankings of a version than this: its win rate and rating show no interval
# ("not enough data yet"). Its pairs come from few independent judgements, and a bootstrap
# over one ranking gives a zero-width "618 - 618" (issue 11.8).
MIN_AB_RANKINGS = 10


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


def version_order(frame: pd.DataFrame) -> list[str]:
    """The x order of a frame's "v0", "v1", ... labels: numeric, so v10 comes after v9."""
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


def wilson(rate, n) -> tuple[float | None, float | None]:
    """95% Wilson interval of a proportion measured on n pairs; (None, None) without both."""
    if rate is None or not n:
        return None, None
    return ev.wilson_interval(rate * n, n, Z)


def interval_text(lo, hi, digits: int = 3) -> str:
    return f"{fmt(lo, digits)} – {fmt(hi, digits)}" if lo is not None else ""


def reward_rows(store: Store) -> list[dict]:
    """Per reward version, oldest first: accuracies with their pair counts and intervals."""
    reasons = {v["version"]: v["reason"] for v in store.list_versions("reward")}
    out = []
    for r in reports.reward_series(store):
        row = {"version": r["version"], "status": r["status"],
               "reason": reasons.get(r["version"]), "ece": r.get("heldout_ece"),
               "train_pairs": r.get("counts.train_pairs")}
        for group in ("heldout", "fresh"):  # strict pairs: the ones accuracy is measured on
            n = r.get(f"{group}_strict_pairs", r.get(f"counts.{group}_strict"))
            n = int(n) if n is not None else None  # metrics rows store numbers as floats
            acc = r.get(f"{group}_accuracy")
            row[group], row[f"{group}_n"] = acc, n
            row[f"{group}_lo"], row[f"{group}_hi"] = wilson(acc, n)
        out.append(row)
    return out


def reward_frames(store: Store) -> dict:
    """Accuracy per reward version with 95% Wilson intervals: the plot's frame (every version,
    a note where it has no held-out accuracy) and the accuracy-history table."""
    rows = reward_rows(store)
    plot = []
    for r in rows:
        for group, label in (("heldout", "held-out accuracy"),
                             ("fresh", "fresh accuracy (newest labels)")):
            if group == "fresh" and r["fresh"] is None:
                continue  # a first version has no fresh pairs: nothing to say
            plot.append({"version": f"v{r['version']}", "series": label,
                         "value": r[group], "lo": r[f"{group}_lo"], "hi": r[f"{group}_hi"],
                         "n": r[f"{group}_n"],
                         "note": "" if r[group] is not None else "no held-out pairs"})
    acc = pd.DataFrame(plot, columns=["version", "series", "value", "lo", "hi", "n", "note"])

    def cells(r, group):
        unknown = "pairs not recorded" if r[group] is not None else ""
        return (fmt(r[group]), interval_text(r[f"{group}_lo"], r[f"{group}_hi"]) or unknown,
                fmt(r[f"{group}_n"]))
    table = pd.DataFrame([{
        "version": f"v{r['version']}", "status": r["status"],
        **dict(zip(("held-out", "held-out 95%", "held-out pairs"), cells(r, "heldout"))),
        **dict(zip(("fresh", "fresh 95%", "fresh pairs"), cells(r, "fresh"))),
        "ECE": fmt(r["ece"]), "train pairs": fmt(r["train_pairs"]), "reason": fmt(r["reason"])}
        for r in reversed(rows)], columns=REWARD_COLUMNS)
    return {"reward_acc": acc, "reward_table": table}


REWARD_COLUMNS = ["version", "status", "held-out", "held-out 95%", "held-out pairs", "fresh",
                  "fresh 95%", "fresh pairs", "ECE", "train pairs", "reason"]


def ppo_frames(store: Store) -> dict[str, pd.DataFrame]:
    """One (step, value, version, lo, hi) frame per PPO metric; steps run on across rounds.
    lo/hi: the 95% interval of a per-round mean over the round's rollouts, when its standard
    deviation and count were logged (PPO_SPREAD), else None."""
    rows = reports.ppo_series(store)
    out = {}
    for name in PPO_PLOTS:
        recs = []
        for r in rows:
            if r.get(name) is None or r.get("step") is None:
                continue
            sd, n = r.get(PPO_SPREAD.get(name, "")), r.get("n_sequences")
            half = Z * sd / math.sqrt(n) if sd is not None and n else None
            value = float(r[name])
            recs.append({"step": r["step"], "value": value, "version": f"v{r['version']}",
                         "lo": value - half if half is not None else None,
                         "hi": value + half if half is not None else None})
        out[name] = pd.DataFrame(recs, columns=["step", "value", "version", "lo", "hi"])
    return out


def not_enough(rankings: int) -> str:
    return f"not enough data yet ({rankings} of {MIN_AB_RANKINGS} A/B rankings)"


def ab_frames(report: dict) -> dict:
    """Win rate vs the baseline per version (table + plot with its 95% interval) and the
    Bradley-Terry leaderboard (bootstrap over whole rankings); below MIN_AB_RANKINGS rankings
    a version's interval reads "not enough data yet"."""
    rates = [{**r, "enough": r["rankings"] >= MIN_AB_RANKINGS} for r in report["win_rates"]]
    table = pd.DataFrame([{
        "version": f"v{r['version']}", "win rate": fmt(r["rate"]),
        "95% interval": (interval_text(r["lo"], r["hi"]) if r["enough"] else
                         not_enough(r["rankings"])) if r["rate"] is not None else "",
        "wins": r["wins"], "ties": r["ties"], "losses": r["losses"], "pairs": r["n"],
        "rankings": r["rankings"]}
        for r in rates], columns=["version", "win rate", "95% interval", "wins", "ties",
                                  "losses", "pairs", "rankings"])
    plot = pd.DataFrame([{
        "version": f"v{r['version']}", "series": "win rate vs reference", "value": r["rate"],
        "lo": r["lo"] if r["enough"] else None, "hi": r["hi"] if r["enough"] else None,
        "n": r["rankings"], "note": ""} for r in rates if r["rate"] is not None],
        columns=["version", "series", "value", "lo", "hi", "n", "note"])
    board = pd.DataFrame([{
        "rank": i + 1, "version": f"v{r['version']}", "rating": fmt(r["rating"], 0),
        "95% interval": rating_interval(r, report["baseline"]), "comparisons": r["n"],
        "rankings": r["rankings"]} for i, r in enumerate(report["leaderboard"])],
        columns=["rank", "version", "rating", "95% interval", "comparisons", "rankings"])
    return {"ab_table": table, "ab_plot": plot, "leaderboard": board}


def rating_interval(row: dict, baseline: int) -> str:
    if row["version"] == baseline:
        return "anchor (1000 by definition)"
    if row["rankings"] < MIN_AB_RANKINGS or row["lo"] is None:
        return not_enough(row["rankings"])
    return interval_text(row["lo"], row["hi"], 0)


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
    Reward hacking shows as KL/length rising while diversity falls and win rate stalls.
    Intervals (95%) where one is measured: win rate (Wilson, from MIN_AB_RANKINGS rankings on)
    and mean length (normal, over the version's newest responses)."""
    diversity = reports.diversity_report(store, max_responses=200)
    rates = {r["version"]: r for r in report["win_rates"]}
    kl = policy_kl(store)
    quality, drift, table = [], [], []
    for d in diversity:
        v, rate = d["version"], rates.get(d["version"], {})
        enough = rate.get("rankings", 0) >= MIN_AB_RANKINGS
        point = {"version": f"v{v}", "lo": None, "hi": None, "n": d["count"], "note": ""}
        if rate.get("rate") is not None:
            quality.append({**point, "series": "win rate vs reference", "value": rate["rate"],
                            "lo": rate["lo"] if enough else None,
                            "hi": rate["hi"] if enough else None, "n": rate["rankings"]})
        for key, label in (("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
                           ("same_opening_share", "same-opening share")):
            quality.append({**point, "series": label, "value": d[key]})
        if kl.get(v) is not None:
            drift.append({**point, "series": "KL from reference", "value": kl[v]})
        if d["mean_tokens"] is not None:
            half = (Z * d["sd_tokens"] / math.sqrt(d["n_tokens"])
                    if d.get("sd_tokens") is not None else None)
            drift.append({**point, "series": "mean length (tokens)", "value": d["mean_tokens"],
                          "lo": d["mean_tokens"] - half if half is not None else None,
                          "hi": d["mean_tokens"] + half if half is not None else None})
        table.append({
            "version": f"v{v}", "responses": d["count"], "distinct-1": fmt(d["distinct_1"]),
            "distinct-2": fmt(d["distinct_2"]), "same opening": fmt(d["same_opening_share"]),
            "mean tokens": fmt(d["mean_tokens"], 1), "stop rate": fmt(d["stop_rate"]),
            "KL": fmt(kl.get(v)), "win rate": fmt(rate.get("rate"))})
    columns = ["version", "series", "value", "lo", "hi", "n", "note"]
    return {"quality": pd.DataFrame(quality, columns=columns),
            "drift": pd.DataFrame(drift, columns=columns), "diversity_table": pd.DataFrame(table)}


def agreement_text(report: dict) -> str:
    if not report["n_items"]:
        return ("No item has been ranked by two annotators yet (set `loop.overlap` above 1 to "
                "measure agreement).")
    return (f"**{report['n_items']}** items ranked by two or more of **{report['n_annotators']}**"
            f" annotators ({report['n_comparisons']} comparisons): pairwise agreement "
            f"**{fmt(report['pairwise_agreement'], 2)}**, Kendall's tau-b "
            f"**{fmt(report['kendall_tau'], 2)}**.")


EMPTY = {"rankings": "No rankings yet.", "reward_acc": "No reward-model versions yet.",
         "ppo": "No policy rounds yet.", "ab": "No blind A/B rankings yet: win rates appear once "
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
                          f"give {report['n_comparisons']} cross-version pairs. The pairs of "
                          "one ranking are correlated, so intervals count rankings: a version "
                          f"gets one from {MIN_AB_RANKINGS} A/B rankings on, and the rating "
                          "bootstrap resamples whole rankings.")}
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
    # lettered as the annotator saw the cards (the Rank page shuffles them per item)
    responses = shown_order(ranking["item_id"], sorted(responses, key=lambda r: r["position"]))
    for r in responses:
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
