"""`rlhf simulate`: scripted annotators drive the real running app over HTTP.

Each round: the annotators rank `--labels-per-round` items through the app's
public API (`gradio_client`, the same endpoints a script or person uses), then
the reward model is retrained, a policy round (`--algorithm` ppo | grpo | rloo |
dpo) runs when it was promoted, and the oracle judges the new policy against the
reference on held-out prompts. A per-round table is printed and written as CSV and JSON.
"""
from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from rlhf_core.data import jobs
from rlhf_core.evaluation import distinct_n, win_rate
from rlhf_core.oracles import check_tiers, compare, load_oracle, noisy

log = logging.getLogger(__name__)
LABELS = "ABCDEFGH"


def add_arguments(p) -> None:
    p.add_argument("--oracle", default="shorter",
                   help="shorter | longer | contains:WORD | mentions:WORD | language:CODE | "
                        "module:function")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of label, train, policy update, evaluate (default 5)")
    p.add_argument("--labels-per-round", type=int, default=32, dest="labels_per_round",
                   help="rankings the scripted annotators submit per round (default 32)")
    p.add_argument("--annotators", type=int, default=2,
                   help="scripted annotators ranking at once (default 2)")
    p.add_argument("--noise", type=float, default=0.0, help="share of random rankings")
    p.add_argument("--eval-samples", type=int, default=2, dest="eval_samples",
                   help="samples per held-out prompt for the oracle's win-rate")
    p.add_argument("--eval-prompts", type=int, dest="eval_prompts",
                   help="judge on at most this many held-out prompts (default: all)")
    p.add_argument("--algorithm", choices=("ppo", "grpo", "rloo", "dpo"),
                   help="the policy round (saved as loop.algorithm; default: the workspace's)")
    p.add_argument("--url", help="drive an app already running here (same workspace); "
                                 "default: start one on a free loopback port")
    p.add_argument("--model", help="policy base (default: the embedded model)")
    p.add_argument("--max-new-tokens", type=int, dest="max_new_tokens",
                   help="longest labeling response in tokens (sampling.max_new_tokens)")
    p.add_argument("--out", type=Path, help="table path without extension "
                                            "(default: WORKSPACE/simulate/run-TIME)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the run: the scripted annotators, the evaluation, and (unless "
                        "--set gives them) sampling.seed, reward.seed and ppo.seed; default 0 "
                        "for the annotators and the workspace's own seeds")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   dest="settings", help="any config value, e.g. --set ppo.lr=2e-4")


@dataclass
class RoundRow:
    round: int
    labels: int
    reward_version: int | None = None
    reward_status: str = ""
    heldout_acc: float | None = None
    fresh_acc: float | None = None
    policy_version: int = 0
    win_rate: float | None = None
    win_lo: float | None = None
    win_hi: float | None = None
    comparisons: int = 0
    kl: float | None = None  # the policy round's, on its rollouts: of the version it started from
    kl_judged: float | None = None  # the judged version's own, on its held-out samples
    mean_tokens: float | None = None
    reference_tokens: float | None = None
    distinct_2: float | None = None  # of the policy's held-out samples
    algorithm: str = ""
    policy_seconds: float | None = None  # the policy round job alone
    policy_aborted: bool = False  # a health gate stopped the round: the parent kept serving
    seconds: float = 0.0
    notes: list = field(default_factory=list)


class JobFailed(RuntimeError):
    """A queued job ended failed or cancelled; `.job` is its row."""

    def __init__(self, kind: str, job: dict):
        super().__init__(f"{kind} job {job['id']} {job['status']}: {job['error']}")
        self.job = job


class AnnotatorGaveUp(RuntimeError):
    """A scripted annotator's calls kept failing: the run stops instead of going on short."""


# What a flaky connection or a busy server looks like from gradio_client: worth a retry.
TRANSIENT = (concurrent.futures.CancelledError, concurrent.futures.TimeoutError, TimeoutError,
             ConnectionError, OSError, httpx.TransportError)


def connect_client(url: str):
    from gradio_client import Client  # imported on use: `rlhf --help` and the CLI stay light
    return Client(url, verbose=False)


class AnnotatorClient:
    """One scripted annotator's connection to the app. Each has its own gradio_client session:
    Gradio answers one call per session at a time, and two calls in flight on one session can
    lose a reply. A transient failure is retried with exponential backoff on a new session; a
    submit retried with the same submission key lands as "saved" or "duplicate", never twice."""

    def __init__(self, url: str, name: str, *, retries: int = 6, backoff_s: float = 0.5,
                 connect=None):
        self.url, self.name, self.retries, self.backoff_s = url, name, retries, backoff_s
        self._connect = connect or connect_client
        self.client = self._connect(url)
        self.retried = 0

    def call(self, *args, api_name: str):
        for attempt in range(self.retries + 1):
            try:
                return self.client.predict(*args, api_name=api_name)
            except TRANSIENT as exc:
                if attempt == self.retries:
                    raise AnnotatorGaveUp(f"{self.name}: {api_name} failed {attempt + 1} times; "
                                          f"last error {type(exc).__name__}: {exc}") from exc
                self.retried += 1
                log.warning("%s: %s failed (%s), retry %d", self.name, api_name,
                            type(exc).__name__, attempt + 1)
                time.sleep(self.backoff_s * 2 ** attempt)
                try:
                    self.client = self._connect(self.url)  # a fresh session
                except TRANSIENT:
                    pass  # the next attempt fails and backs off again


class Simulation:
    def __init__(self, store, cfg, url: str, *, oracle_spec: str, annotators: int,
                 noise: float, seed: int, eval_samples: int, connect=None,
                 eval_prompts: int | None = None):
        self.store, self.cfg, self.url, self._connect = store, cfg, url, connect
        self.oracle = load_oracle(oracle_spec)
        self.annotators = [f"sim-{i + 1}" for i in range(annotators)]
        self.clients: dict[str, AnnotatorClient] = {}
        self.noise, self.seed, self.eval_samples = noise, seed, eval_samples
        self.eval_prompts = eval_prompts
        self.labels = 0
        self._pending = 0
        self._lock = threading.Lock()

    # -- labeling through the HTTP API ---------------------------------------------
    def label(self, n: int, timeout_s: float = 3600) -> int:
        """Rank `n` more items, the annotators working concurrently."""
        target = self.labels + n
        deadline = time.monotonic() + timeout_s
        failures: list[BaseException] = []

        def run(name: str, i: int) -> None:
            try:
                self._annotate(name, target, deadline, i)
            except BaseException as exc:  # reported after the join: the run fails loudly
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(name, i), name=name)
                   for i, name in enumerate(self.annotators)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise AnnotatorGaveUp(f"{len(failures)} scripted annotator(s) stopped: "
                                  + "; ".join(f"{type(e).__name__}: {e}" for e in failures))
        return self.labels

    def client_for(self, name: str) -> AnnotatorClient:
        if name not in self.clients:
            self.clients[name] = AnnotatorClient(self.url, name, connect=self._connect)
        return self.clients[name]

    def _annotate(self, name: str, target: int, deadline: float, i: int) -> None:
        rng = random.Random(f"{self.seed}-{name}-{target}")
        while time.monotonic() < deadline:
            with self._lock:  # reserve a label slot, so the round ends at exactly `target`
                if self.labels + self._pending >= target:
                    return
                self._pending += 1
            done = False
            try:
                done = self._rank_one(name, rng)
            finally:
                with self._lock:
                    self._pending -= 1
                    self.labels += int(done)
            if not done:  # nothing ready: make sure the worker is sampling, then wait
                jobs.enqueue(self.store, "sample_batch", {}, requested_by="simulate", unique=True)
                time.sleep(1.0)

    def _rank_one(self, name: str, rng: random.Random) -> bool:
        client = self.client_for(name)
        item = client.call(name, api_name="/get_item").get("item")
        if not item:
            return False
        texts = [r["text"] for r in item["responses"]]
        tiers = noisy(check_tiers(self.oracle(item["prompt"], texts), len(texts)),
                      self.noise, rng)
        ranking = " > ".join("=".join(item["responses"][j]["label"] for j in tier)
                             for tier in tiers)
        key = uuid.uuid4().hex  # one key for every retry of this submission
        res = client.call(name, item["id"], item.get("token") or "", key, ranking, False, False,
                          False, "", 1.0, api_name="/submit")
        if not res.get("ok"):
            log.warning("%s: submit refused: %s", name, res.get("message"))
        return bool(res.get("ok"))

    # -- model jobs, queued like a researcher's button ------------------------------
    def run_job(self, kind: str, params: dict | None = None, timeout_s: float = 3600) -> dict:
        job_id = jobs.enqueue(self.store, kind, params or {}, requested_by="simulate")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = jobs.get_job(self.store, job_id)
            if job["status"] in ("done", "failed", "cancelled"):
                if job["status"] != "done":
                    raise JobFailed(kind, job)
                return job["result"] or {}
            time.sleep(1.0)
        raise TimeoutError(f"{kind} job {job_id} did not finish in {timeout_s:.0f} s")

    def evaluate(self, version: int) -> dict:
        """The oracle's win-rate of `version` against the reference on held-out prompts."""
        result = self.run_job("eval_policy", {"policy_version": version, "baseline": 0,
                                              "samples_per_prompt": self.eval_samples,
                                              "max_prompts": self.eval_prompts,
                                              "seed": self.seed + 99})
        wins = ties = losses = 0
        for s in result["samples"]:
            outcome = compare(self.oracle, s["prompt"], s["policy"], s["baseline"])
            wins += outcome == 1.0
            ties += outcome == 0.5
            losses += outcome == 0.0
        samples = result["samples"]
        return {**win_rate(wins, ties, losses),
                "mean_tokens": sum(s["policy_tokens"] for s in samples) / max(1, len(samples)),
                "distinct_2": distinct_n([s["policy"] for s in samples], 2),
                "kl": result.get("kl"),
                "reference_tokens": sum(s["baseline_tokens"] for s in samples) / max(1, len(samples))}

    def round(self, r: int, labels_per_round: int) -> RoundRow:
        t0 = time.monotonic()
        self.label(labels_per_round)
        row = RoundRow(round=r, labels=self.labels)
        reward = self.run_job("train_reward")
        metrics = reward.get("metrics") or {}
        row.reward_version, row.reward_status = reward.get("version"), reward.get("status", "")
        row.heldout_acc = metrics.get("heldout_accuracy")
        row.fresh_acc = metrics.get("fresh_accuracy")
        if reward.get("status") == "promoted" or self.store.current_version("reward"):
            t_policy = time.monotonic()
            try:
                ppo = self.run_job("ppo_round", {"algorithm": self.cfg.loop.algorithm})
            except JobFailed as exc:  # a health gate: nothing published, the parent serves on
                error = exc.job.get("error") or ""
                if "PPO round aborted, nothing published" not in error:  # any health gate
                    raise
                ppo = {}
                row.policy_aborted = True
                row.notes.append("policy round aborted, nothing published: "
                                 + error.split("nothing published: ", 1)[-1])
            row.policy_seconds = round(time.monotonic() - t_policy, 1)
            row.algorithm = ppo.get("algorithm", self.cfg.loop.algorithm)
            pm = ppo.get("metrics") or {}
            row.kl = pm.get("kl", ppo.get("kl"))
            if pm.get("gate_fallback"):
                row.notes.append(f"approx_kl gate tripped at step {pm['gate_fallback']}: "
                                 f"published the policy of step {pm.get('ppo_steps')}")
            elif pm.get("early_stop"):
                row.notes.append(f"stopped early at step {pm['early_stop']} (stop_approx_kl)")
        else:
            row.notes.append(f"reward not promoted: {reward.get('reason')}")
        row.policy_version = self.store.current_version("policy")["version"]
        if row.policy_version > 0:
            ev = self.evaluate(row.policy_version)
            row.win_rate, row.win_lo, row.win_hi = ev["rate"], ev["lo"], ev["hi"]
            row.comparisons, row.mean_tokens = ev["n"], ev["mean_tokens"]
            row.distinct_2 = ev["distinct_2"]
            row.kl_judged = ev["kl"]
            row.reference_tokens = ev["reference_tokens"]
        row.seconds = round(time.monotonic() - t0, 1)
        return row


# -- running the app and printing the table -------------------------------------------
def format_table(rows: list[RoundRow]) -> str:
    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)
    head = (f"{'round':>5} {'labels':>6} {'reward':>7} {'heldout':>7} {'fresh':>6} {'policy':>6} "
            f"{'win-rate [95% CI]':>22} {'n':>4} {'KL':>6} {'roll-KL':>7} {'tokens':>6} {'ref':>5} "
            f"{'dist-2':>6} "
            f"{'algo':>5} {'policy s':>8} {'sec':>6}")
    lines = [head]
    for r in rows:
        win = "-" if r.win_rate is None else f"{r.win_rate:.0%} [{r.win_lo:.0%}, {r.win_hi:.0%}]"
        rv = f"v{r.reward_version}{'' if r.reward_status == 'promoted' else '*'}" \
            if r.reward_version else "-"
        lines.append(f"{r.round:>5} {r.labels:>6} {rv:>7} {f(r.heldout_acc):>7} "
                     f"{f(r.fresh_acc):>6} {'v%d' % r.policy_version:>6} {win:>22} "
                     f"{r.comparisons:>4} {f(r.kl_judged):>6} {f(r.kl):>7} "
                     f"{f(r.mean_tokens, '.1f'):>6} "
                     f"{f(r.reference_tokens, '.1f'):>5} {f(r.distinct_2):>6} "
                     f"{r.algorithm or '-':>5} {f(r.policy_seconds, '.0f'):>8} {r.seconds:>6.0f}")
    notes = [f"round {r.round}: {n}" for r in rows for n in r.notes]
    return "\n".join(lines + ["(* = candidate not promoted; KL: the judged policy's from the "
                              "reference, per sequence, on its held-out samples; roll-KL: the "
                              "policy round's on its rollouts, i.e. of the version it started "
                              "from)"] + notes)


def write_table(rows: list[RoundRow], out: Path) -> None:
    from dataclasses import asdict
    out.parent.mkdir(parents=True, exist_ok=True)
    data = [asdict(r) for r in rows]
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(data[0]) if data else ["round"])
        w.writeheader()
        w.writerows(data)


def workspace_overrides(args) -> dict:
    """The settings a run sets in its workspace: the simulator's pacing, `--seed` as the seed of
    the labeling batches, the reward model and the policy rounds (so two seeds are two runs),
    then every `--set` (which wins)."""
    from rlhf_core.workspace import parse_settings
    lpr = args.labels_per_round
    # The simulator paces the loop itself: one batch of a round's size per policy version
    # (PPO queues it from the new policy), no pre-sampling from the old policy while the
    # reward model and PPO train, and no researcher-view scoring.
    seeds = ({f"{section}.seed": args.seed for section in ("sampling", "reward", "ppo")}
             if args.seed is not None else {})
    return {"model": args.model, "sampling.max_new_tokens": args.max_new_tokens,
            "sampling.min_ready_items": 0, "sampling.prompts_per_batch": lpr,
            "loop.auto": False, "loop.score_items": False,
            "loop.algorithm": getattr(args, "algorithm", None),
            **seeds, **parse_settings(args.settings)}


def main(args, start_app) -> list[RoundRow]:
    """`start_app(workspace) -> (url, stop)` starts UI + worker (the app layer provides it)."""
    from rlhf_core.workspace import open_workspace, seed_prompts_if_empty
    lpr = args.labels_per_round
    store, cfg = open_workspace(args.workspace, **workspace_overrides(args))
    seed_prompts_if_empty(store, cfg)
    stop = None
    url = args.url
    if not url:
        url, stop = start_app(cfg.workspace)
    out = args.out or cfg.workspace / "simulate" / time.strftime("run-%Y%m%d-%H%M%S")
    rows: list[RoundRow] = []
    try:
        sim = Simulation(store, cfg, url, oracle_spec=args.oracle, annotators=args.annotators,
                         noise=args.noise, seed=args.seed or 0, eval_samples=args.eval_samples,
                         eval_prompts=getattr(args, "eval_prompts", None))
        for r in range(1, args.rounds + 1):
            rows.append(sim.round(r, lpr))
            write_table(rows, out)
            print(format_table(rows), flush=True)
    finally:
        if stop is not None:
            stop()
    print(f"table written to {out}.csv and {out}.json")
    return rows
