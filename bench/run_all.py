"""Run the benchmark suite: `python -m bench.run_all [--only B1,B4] [--quick]` (or `make bench`).

Each benchmark measures ours against a peer in the same run on the same machine and writes
bench/results/<name>.json; this prints one table (ratios first) and writes
bench/results/latest.json with every result plus the machine. A benchmark that fails is
recorded with its error; the others still run. cuda is used when present (accelerate's choice).
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback

from bench import common

SUITE = {  # id -> (module, results name[, keywords of its run()])
    "B0": ("bench.b0_startup", "b0_startup"),
    "B1": ("bench.b1_sampling", "b1_sampling"),
    "B2": ("bench.b2_ppo_trl", "b2_ppo_trl"),
    "B3": ("bench.b3_reward_trl", "b3_reward_trl"),
    "B4": ("bench.b4_latency", "b4_latency"),
    "B5": ("bench.b5_loop", "b5_loop"),
    "B9": ("bench.b9_algorithms_trl", "b9_algorithms_trl"),
    # B9 at the project's precision on a bf16 CPU (bf16 autocast on both sides, as B2 runs)
    "B9-BF16": ("bench.b9_algorithms_trl", "b9_algorithms_trl_bf16", {"precision": "bf16"}),
}


def _f(x, fmt="{:.2f}"):
    return "n/a" if x is None else fmt.format(x)


def _acc(acc, n) -> str:
    if acc is None or not n:
        return "n/a"
    from rlhf_core.evaluation import wilson_interval
    lo, hi = wilson_interval(acc * n, n)
    return f"{acc:.3f} [{lo:.2f}, {hi:.2f}]"


def _trl(version: str) -> str:
    """'torch trl transformers peft' (trl_env's stamp) -> 'trl X'."""
    parts = version.split()
    return f"trl {parts[1]}" if len(parts) == 4 else version


def _per_round(r: dict, ours: str) -> str:
    """B1's per-round ratios (ours / generate in the same round) as ' (min-max)'."""
    per = (r.get("responses_per_s") or {}).get("per_round") or {}
    if not per.get(ours) or not per.get("peer"):
        return ""
    ratios = [a / b for a, b in zip(per[ours], per["peer"]) if b]
    return f" ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else ""


def ratio_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(benchmark, metric, value, goal) - ratios first, then the absolute context."""
    rows, ctx = [], []
    r = results.get("B0")
    if r and "error" not in r:
        w = r["warm"]
        spread = (f" ({w['first_item_s_min']}-{w['first_item_s_max']})"
                  if "first_item_s_min" in w else "")
        ctx.append(("B0", "rlhf up -> first rankable item, s (cold / new workspace, median)",
                    f"{r['cold']['first_item_s']} / {w['first_item_s']}{spread}", "-"))
    r = results.get("B1")
    if r and "error" not in r:
        rows.append(("B1", "labeling responses/s, ours/plain generate (v0 = base), per round",
                     _f(r["ratio"]) + _per_round(r, "ours_v0"), ">= 1.5"))
        rows.append(("B1", "same, with a LoRA policy adapter (un-merged)",
                     _f(r["ratio_lora"]) + _per_round(r, "ours_lora"), ">= 1.5"))
        paired = r.get("batch1_fraction_paired_median")  # absent in older result files
        rows.append(("B1", "batch-1 decode, fraction of the read-bandwidth bound "
                     f"({r['decode_dtype_auto'].split('.')[-1]} weights; best decode / best "
                     "probe of the rounds" + ("; paired median" if paired is not None else "")
                     + ")",
                     _f(r["batch1_fraction_of_bound"])
                     + (f"; {_f(paired)}" if paired is not None else ""), ">= 0.5"))
        for path, by_batch in r["tokens_per_s"].items():
            ctx.append(("B1", f"decode tokens/s at batch 1/4/16, {path}",
                        " / ".join(str(by_batch[b]) for b in ("1", "4", "16")), "-"))
        bound = " / ".join(f"{k.split('.')[-1]} {v}"
                           for k, v in r["batch1_bound_tokens_per_s"].items())
        probes = r.get("read_bandwidth_gb_s_probes")
        spread = f" (probes {min(probes)}-{max(probes)})" if probes else ""
        ctx.append(("B1", "batch-1 bound: read GB/s -> tokens/s",
                    f"{r['read_bandwidth_gb_s']}{spread} -> {bound}", "-"))
        ctx.append(("B1", "matmul kernel GB/s -> batch-1 kernel bound tokens/s",
                    f"{r['matmul_kernel_gb_s']} -> {r['batch1_kernel_bound_tokens_per_s']}",
                    "-"))
        if r.get("native_matvec_gb_s") is not None:
            ctx.append(("B1", "native step's matrix-vector product, read GB/s (170 MB bf16)",
                        str(r["native_matvec_gb_s"]), "-"))
    r = results.get("B2")
    if r and "error" not in r:
        rows += b2_rows(r)
        for side, x in r["median"].items():
            sp = (r.get("spread") or {}).get(side, {}).get("wall_s") or {}
            ctx.append(("B2", f"{side}: round s median (min-max; gen/score/train), peak RSS MB",
                        f"{x['wall_s']} ({sp.get('min')}-{sp.get('max')}; "
                        f"{x['time_generate']}/{x['time_score']}/{x['time_train']}), "
                        f"{x['peak_rss_mb']:.0f}", "-"))
    r = results.get("B3")
    if r and "error" not in r:
        sp = r.get("ratio_spread") or {}
        spread = f" ({sp['min']:.2f}-{sp['max']:.2f})" if sp else ""
        rows.append(("B3", f"reward training pairs/s, ours/TRL ({_trl(r['trl_version'])}), "
                     "min-max over runs", _f(r["ratio"]) + spread, ">= 1.2"))
        n = r["setting"]["heldout_pairs"]
        ctx.append(("B3", f"held-out accuracy ours / TRL ({n} pairs, 95% Wilson)",
                    f"{_acc(r['ours']['heldout_accuracy'], n)} / "
                    f"{_acc(r['trl']['heldout_accuracy'], n)}", "equal"))
    r = results.get("B4")
    if r and "error" not in r:
        # results before 2026-12-01 ran PPO (then the default); the key stays "ppo"
        busy = f"{r.get('policy_algorithm', 'ppo').upper()} round running"
        for phase in ("idle", "ppo"):
            for n, x in r[phase].items():
                goal = "p95 <= 150" if (phase == "ppo" and n == "32") else "-"
                think = r.get("levels", {}).get(n, {}).get("think_s")
                who = f"{n} annotators" + (f" (think {think[0]:g}-{think[1]:g} s)" if think else "")
                ctx.append(("B4", f"{busy if phase == 'ppo' else phase}, {who}: p50/p95/p99 ms, "
                            "failed, lost",
                            f"{x['p50_ms']}/{x['p95_ms']}/{x['p99_ms']}, {x['failed']}, "
                            f"{x['lost']}", goal))
        g = r.get("gradio_client") or {}
        ctx.append(("B4", "gradio_client overhead per call (ms, p50)",
                    _f(g.get("overhead_ms_p50"), "{:.1f}"), "reported apart"))
        ctx.append(("B4", f"share of the busy phase with a {busy}",
                    _f(r.get("ppo_running_fraction")), "1.0"))
    for bid in ("B9", "B9-BF16"):
        r = results.get(bid)
        if not r or "error" in r:
            continue
        bf16 = r.get("precision") == "bf16"
        math = "bf16 autocast" if bf16 else "float32"
        for alg, a in r["algorithms"].items():
            # in float32 the same-work side decodes in float32 too (ours-f32) where it ran;
            # under bf16 training that is not TRL's precision either: the defaults (ours)
            side = "ours-f32" if "ratio_trl_over_ours-f32" in a and not bf16 else "ours"
            per_run = a.get(f"ratio_per_run_trl_over_{side}") or []
            spread = f" ({min(per_run):.2f}-{max(per_run):.2f})" if per_run else ""
            rows.append((bid, f"{alg} round speed-up vs {a['trl_trainer']} ({math}; TRL s / "
                         "ours s)", f"{_f(a.get(f'ratio_trl_over_{side}'))}{spread}", "-"))
            rows.append((bid, f"{alg} peak RSS, ours/TRL ({math})",
                         _f(a.get(f"rss_ratio_{side}_over_trl")), "<= 0.5"))
    r = results.get("B5")
    if r and "error" not in r:
        s = r["split"]
        alg = r.get("policy_algorithm", "ppo").upper()
        ctx.append(("B5", f"loop latency s (reward / {alg} round / sampling / other / waiting)",
                    f"{r['total_s']} ({s.get('reward_training')} / {s.get('ppo')} / "
                    f"{s.get('sampling')} / {s.get('other_jobs_s')} / {s.get('waiting_s')})", "-"))
    for bid, r in results.items():
        if isinstance(r, dict) and "error" in r:
            ctx.append((bid, "FAILED", r["error"].splitlines()[-1][:80], "-"))
    return rows + ctx


def b2_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """B2's ratios, one row per pair of our side and TRL side that ran (older results: the
    single `speedup`). The goal rows are the project defaults' side: `ours` (since the B9 fix
    it decodes rollouts in float32 as `ours-f32` did; a result written before it is read from
    `ours-f32`)."""
    trl = _trl(r["trl_version"])
    if "speedup_by_pair" not in r:
        return [("B2", f"PPO round speed-up vs TRL ({trl})", _f(r["speedup"]), ">= 2"),
                ("B2", "peak RSS, ours/TRL", _f(r["memory_ratio"]), "<= 0.5")]
    default = "ours-f32" if "ours-f32_vs_trl-full" in r["speedup_by_pair"] else "ours"
    goals = {"trl-full": ">= 2", "trl-lora": ">= 1.5"}
    out = []
    for pair, speedup in r["speedup_by_pair"].items():
        ours, peer = pair.split("_vs_")
        if ours == "ours" and default == "ours-f32":
            continue  # bf16 rollouts: not what the defaults do any more
        run = r["ratios"][pair]["wall_s"]
        # the goal is the defaults' (at either precision, each side at the same one)
        goal = goals.get(peer.split("@")[0], "-") if ours.split("@")[0] == default else "-"
        out.append(("B2", f"PPO round speed-up, {ours} vs {peer} ({trl}), per run "
                          f"{run['per_run_min']}-{run['per_run_max']}", _f(speedup), goal))
        ph = r["ratios"][pair]
        out.append(("B2", "  by phase: generate / score / train",
                    " / ".join(_f(ph[k]["of_medians"]) for k in
                               ("time_generate", "time_score", "time_train")), "-"))
        out.append(("B2", f"  peak RSS, {ours}/{peer}", _f(r["memory_ratio_by_pair"][pair]),
                    "<= 0.5" if ours.split("@")[0] == default else "-"))
        med = r.get("median") or {}
        keys = [f"phase_peak_rss_{ph}_mb" for ph in ("generate", "score", "train")]
        if all(k in med.get(ours, {}) and k in med.get(peer, {}) for k in keys):
            out.append(("B2", f"  each phase's own peak RSS, {ours}/{peer}: generate / score / "
                        "train", " / ".join(f"{med[ours][k] / med[peer][k]:.3f}" for k in keys),
                        "<= 0.5" if ours.split("@")[0] == default else "-"))
    return out


def table(results: dict) -> str:
    rows = [("bench", "metric", "value", "goal")] + ratio_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows[1:]])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated ids, e.g. B1,B4")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--collect", action="store_true",
                    help="rebuild latest.json and the table from bench/results/<name>.json only")
    args = ap.parse_args(argv)
    latest = common.RESULTS / "latest.json"
    if args.collect:
        results = {bid: json.loads((common.RESULTS / f"{name}.json").read_text())
                   for bid, (_, name, *_kw) in SUITE.items()
                   if (common.RESULTS / f"{name}.json").exists()}
        out = {"machine": common.machine(), "results": results,
               "written_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        common.write_result("latest", out)
        print(table(results))
        return out
    ids = [i.strip().upper() for i in args.only.split(",")] if args.only else list(SUITE)
    previous = json.loads(latest.read_text())["results"] if latest.exists() else {}
    results = dict(previous)  # --only keeps the other benchmarks' last results in latest.json
    for bid in ids:
        module, name, *kw = SUITE[bid]
        kw = kw[0] if kw else {}
        print(f"== {bid} ({module}{' --quick' if args.quick else ''}"
              f"{''.join(f' --{k} {v}' for k, v in kw.items())})", flush=True)
        t0 = time.perf_counter()
        try:
            res = importlib.import_module(module).run(quick=args.quick, **kw)
            res["quick"], res["bench_seconds"] = args.quick, round(time.perf_counter() - t0, 1)
            res["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            common.write_result(name, res)
        except Exception:
            res = {"error": traceback.format_exc(), "quick": args.quick}
            print(res["error"], flush=True)
        results[bid] = res
    out = {"machine": common.machine(), "results": results,
           "written_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    common.write_result("latest", out)
    print()
    print(table(results))
    return out


if __name__ == "__main__":
    main()
