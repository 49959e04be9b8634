"""Reward model: pairs, learning, incremental replay, the promotion gate, publishing, errors.

Tiny random Llama from conftest, real SQLite, rankings entered through rlhf_core.data.annotation.
The synthetic annotator prefers responses containing the marker word "yes".
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_core.worker.run import run_one
from rlhf_core import models
from rlhf_core.config import AppConfig, RewardConfig
from rlhf_core.data import annotation, jobs, reports
from rlhf_core.losses import bradley_terry_loss, soft_bradley_terry_loss
from rlhf_core.reward import data as reward_data
from rlhf_core.reward import model as reward_scoring
from rlhf_core.reward import round as reward_model
from rlhf_core.reward import train as reward_train
from rlhf_core.reward.data import RewardDataError
from rlhf_core.worker.runtime import Runtime

WORDS = ("the quick brown fox jumps over lazy dog hello world how are you today "
         "write short poem about sea").split()
MARKER = "yes"
FAST = RewardConfig(lr=1e-2, epochs=4, rankings_per_step=4, min_pairs=8)
# Tests that need a promoted version but not learning (12 prompts: ~12 held-out pairs).
NO_GATE = replace(FAST, promote_min_heldout_pairs=0, promote_min_accuracy=0.0)
# Tests that check learning. Over 10 tiny-model inits x 2 seeds (40 trainings, shared and
# separate base) FAST ended as low as 0.57 held-out accuracy, barely trained; this setting
# scored >= 0.977 on every one of the 40 (44 held-out pairs each), about 2 s per training.
LEARN = replace(FAST, lr=5e-3, epochs=8)
# What "learned" means, with margins no init or release rounding flips: held-out accuracy of
# at least 0.8 (the same 40 models untrained scored 0.07-0.73 on those pairs: the pairs of one
# prompt move together, so chance reaches far), and a mean P(chosen) of at least 0.57 (an
# untrained head, std 0.02, scores everything near 0: 0.493-0.505; trained: >= 0.64).
MIN_ACCURACY, MIN_P_CHOSEN = 0.8, 0.57
# A warm-started round: at LEARN's lr, 2 of 10 inits forgot (held-out 0.55 and 0.70 from 1.0;
# Adam's first steps move every weight by about lr); at this one 12 of 12 kept >= v1's.
# Tolerance 0.1: one held-out pair is 0.018 there, and the gate has its own tests below.
FINE_TUNE = replace(LEARN, lr=1e-3, epochs=4, promote_tolerance=0.1)


def assert_learned(metrics: dict, prefix: str = "heldout") -> None:
    assert metrics[f"{prefix}_accuracy"] >= MIN_ACCURACY, metrics
    assert metrics[f"{prefix}_mean_p_chosen"] >= MIN_P_CHOSEN, metrics


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seed_rankings(store, n: int, *, start: int = 0, flip_train: bool = False,
                  ties_only: bool = False, seed: int = 0) -> list[int]:
    """n prompts, one item of 2 marker + 2 plain responses each, ranked by the annotator.
    Returns the prompt ids. flip_train: on train-split prompts the plain ones win."""
    rng = random.Random(seed + start)
    recs = [{"text": f"prompt {i}: " + " ".join(rng.choice(WORDS) for _ in range(5))}
            for i in range(start, start + n)]
    store.add_prompts(recs, source="test", heldout_fraction=0.25)
    pids = [store.scalar("SELECT id FROM prompts WHERE text = ?", [r["text"]]) for r in recs]
    items = []
    for pid in pids:
        responses = []
        for good in (True, True, False, False):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
            if good:
                words.insert(rng.randint(0, len(words)), MARKER)
            responses.append({"text": " ".join(words)})
        items.append({"prompt_id": pid, "responses": responses})
    annotation.create_batch(store, policy_version=0, k=4, items=items)
    while (item := annotation.next_item(store, "alice")) is not None:
        good = [r["id"] for r in item["responses"] if MARKER in r["text"].split()]
        bad = [r["id"] for r in item["responses"] if r["id"] not in good]
        split = store.scalar("SELECT split FROM prompts WHERE id = ?", [item["prompt_id"]])
        tiers = [good + bad] if ties_only else [good, bad]
        if flip_train and split == "train":
            tiers = [bad, good]
        annotation.submit_ranking(store, annotator="alice", item_id=item["id"],
                                  token=item["token"], submission_key=f"k-{item['id']}",
                                  tiers=tiers)
    return pids


def marker_pairs(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(prompts, responses with the marker, the same responses without it), like seed_rankings'."""
    rng = random.Random(seed)
    prompts, marked, plain = [], [], []
    for i in range(n):
        prompts.append(f"prompt {900 + i}: " + " ".join(rng.choice(WORDS) for _ in range(5)))
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        plain.append(" ".join(words))
        words.insert(rng.randint(0, len(words)), MARKER)
        marked.append(" ".join(words))
    return prompts, marked, plain


def make_runtime(store, model_dir, cfg=FAST, **kw) -> Runtime:
    app = AppConfig(workspace=store.path.parent, model=str(model_dir), reward=cfg, **kw)
    return Runtime(store, app, cpu=True)


def accuracy_on(scorer, pairs) -> float:
    texts = {}
    for p in pairs:
        texts[p.chosen_id], texts[p.rejected_id] = (p.prompt, p.chosen), (p.prompt, p.rejected)
    ids = sorted(texts)
    scores = dict(zip(ids, scorer.score_texts([texts[i][0] for i in ids],
                                              [texts[i][1] for i in ids])))
    strict = [p for p in pairs if not p.is_tie]
    return sum(scores[p.chosen_id] > scores[p.rejected_id] for p in strict) / len(strict)


# -- pure pieces -----------------------------------------------------------------------------
def test_pair_loss_ties_margin_and_centering():
    chosen, rejected = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([0.0, 1.0, 1.5])
    labels, gaps = torch.tensor([1.0, 1.0, 0.5]), torch.tensor([1.0, 3.0, 0.0])
    cfg = RewardConfig(use_margin=True, margin_scale=0.5, center_coef=0.1)
    got = reward_train.pair_loss(chosen, rejected, labels, gaps, cfg)
    bt = bradley_terry_loss(chosen[:2], rejected[:2], torch.tensor([0.0, 1.0]))  # 0.5*(gap-1)
    tie = soft_bradley_terry_loss(chosen[2:], rejected[2:], 0.5)
    center = 0.1 * ((chosen + rejected) ** 2).mean()
    assert torch.allclose(got, 2 / 3 * bt + 1 / 3 * tie + center)
    plain = reward_train.pair_loss(chosen[:2], rejected[:2], labels[:2], gaps[:2], RewardConfig())
    assert torch.allclose(plain, bradley_terry_loss(chosen[:2], rejected[:2]))


def _pair(i, ranking, label=1.0, split="train", c=1, r=2):
    return reward_data.PrefPair(i, ranking, 1, split, c, r, label, 1, "p", "c", "r")


def test_pair_metrics_hand_values():
    pairs = [_pair(1, 1, c=1, r=2), _pair(2, 1, c=3, r=2), _pair(3, 1, label=0.5, c=1, r=3)]
    m = reward_data.pair_metrics(pairs, {1: 1.0, 2: 0.0, 3: -1.0})
    assert m["accuracy"] == 0.5 and m["strict_pairs"] == 2
    s = torch.sigmoid(torch.tensor([1.0, -1.0, 2.0]))
    assert m["mean_p_chosen"] == pytest.approx(s.mean().item())
    assert m["observed_p_chosen"] == pytest.approx(2.5 / 3)
    assert m["loss"] == pytest.approx(-torch.log(s[:2]).mean().item())
    assert m["ece"] == pytest.approx(abs(0.7311 - 0.5), abs=1e-3)  # one bin, conf .731, acc .5


def _held(accuracy, pairs):
    return {"heldout": {"accuracy": accuracy, "strict_pairs": pairs}}


def test_gate_first_version_needs_pairs_and_an_interval_above_chance():
    gate, cfg, v1 = reward_train.promotion_gate, RewardConfig(), {"version": 1}
    status, reason = gate(_held(0.9, 12), {}, None, cfg)  # 12 < 20 pairs
    assert status == "rejected" and "not enough evidence" in reason
    assert "on 12 pairs (at least 20 needed)" in reason and "promote_min_heldout_pairs" in reason
    # issue 11.8: v1 at 0.500 on 24 pairs; the 95% Wilson interval is [0.314, 0.686]
    status, reason = gate(_held(0.5, 24), {}, None, cfg)
    assert status == "rejected" and "[0.314, 0.686] reaches below 0.5" in reason
    # on 24 pairs 17 right is the fewest whose interval clears 0.5 (16/24: low end 0.467)
    assert gate(_held(16 / 24, 24), {}, None, cfg)[0] == "rejected"
    status, reason = gate(_held(17 / 24, 24), {}, None, cfg)
    assert status == "promoted" and reason.startswith("first reward version, held-out accuracy "
                                                      "0.708 on 24 pairs")
    assert "95% interval [0.508, 0.851]" in reason
    # ... and v2 at 0.500 vs v1's 0.500 (issue 11.8) is no longer promoted either
    status, reason = gate(_held(0.5, 24), _held(0.5, 24), v1, cfg)
    assert status == "rejected" and reason.endswith("v1 keeps serving")
    assert gate(_held(None, 0), {}, None, cfg)[0] == "rejected"


def test_gate_later_version_within_tolerance_of_the_current():
    gate, cfg, v1 = reward_train.promotion_gate, RewardConfig(), {"version": 1}
    status, reason = gate(_held(0.89, 100), _held(0.9, 100), v1, cfg)  # 0.01 below, tol 0.02
    assert status == "promoted" and "v1 had 0.900 on the same pairs (tolerance 0.02)" in reason
    status, reason = gate(_held(0.85, 100), _held(0.9, 100), v1, cfg)
    assert status == "rejected" and "worse than v1's 0.900" in reason
    assert "tolerance 0.02" in reason and reason.endswith("v1 keeps serving")
    assert gate(_held(0.95, 19), _held(0.5, 19), v1, cfg)[0] == "rejected"  # too few pairs
    # the rules are config: no pairs needed and no floor turn the gate off
    off = replace(cfg, promote_min_heldout_pairs=0, promote_min_accuracy=0.0)
    assert gate(_held(None, 0), {}, None, off)[0] == "promoted"
    assert gate(_held(None, 0), {}, v1, off) == (
        "promoted", "no held-out pairs to compare on: promoted without the accuracy gate")
    # z = 0: the interval shrinks to the point estimate
    assert gate(_held(0.55, 40), {}, None, replace(cfg, promote_z=0.0))[0] == "promoted"
    assert gate(_held(0.55, 40), {}, None, cfg)[0] == "rejected"


def test_replay_and_steps_keep_rankings_whole_and_are_seeded():
    pairs = [_pair(i, ranking=i // 3) for i in range(30)]  # 10 rankings of 3 pairs
    a, b = reward_data.replay_sample(pairs, 7, seed=1), reward_data.replay_sample(pairs, 7, seed=1)
    assert a == b and len(a) == 9 and len({p.ranking_id for p in a}) == 3
    steps = reward_data.ranking_steps(pairs, 4, random.Random(0))
    assert [len({p.ranking_id for p in s}) for s in steps] == [4, 4, 2]
    assert sorted(p.id for s in steps for p in s) == list(range(30))


# -- training ----------------------------------------------------------------------------------
def test_learns_separable_preference_and_publishes_safetensors(store, tiny_model_dir):
    seed_rankings(store, 40)
    runtime = make_runtime(store, tiny_model_dir, cfg=LEARN)
    base_before = {n: p.detach().clone() for n, p in runtime.model.named_parameters()
                   if "lora_" not in n}
    policy_before = {n: p.detach().clone() for n, p in runtime.model.named_parameters()
                     if ".policy." in n}
    res = reward_model.train_reward(runtime)
    assert res["status"] == "promoted" and res["version"] == 1, res["reason"]
    assert_learned(res["metrics"])
    assert res["counts"]["heldout_strict"] > 0 and res["counts"]["train_ties"] > 0

    # Parameters changed; the base weights and the policy adapter did not.
    params = dict(runtime.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in base_before.items())
    assert all(torch.equal(params[n], v) for n, v in policy_before.items())
    lora_b = [p for n, p in params.items() if ".reward." in n and "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero
    scorer = reward_model.load_reward(runtime)
    fresh_head = models.ScalarHead(runtime.hidden_size, LEARN.head_init_std, LEARN.seed + 1)
    assert not torch.equal(scorer.head.linear.weight, fresh_head.linear.weight)
    assert scorer.version == 1 and scorer.shares_base and scorer.adapter_name == "reward"

    # Layout: safetensors + JSON only, manifest with config, counts and metrics; DB row last.
    path = Path(store.current_version("reward")["path"])
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert {"reward/adapter_model.safetensors", "reward/adapter_config.json",
            "score_head.safetensors", "version.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]
    manifest = json.loads((path / "version.json").read_text())
    assert manifest["config"]["lr"] == LEARN.lr and manifest["counts"]["max_pair_id"] > 0
    assert manifest["metrics"]["heldout_accuracy"] == res["metrics"]["heldout_accuracy"]

    # The scorer prefers a marker response to the same response without it: 40 new pairs, 36
    # needed (16 inits: 38-40 trained). Untrained models also reach 0-39 here (inserting one
    # token moves a random score one way), so assert_learned above is what proves learning.
    prompts, marked, plain = marker_pairs(40, seed=7)
    assert sum(a > b for a, b in zip(scorer.score_texts(prompts, marked),
                                     scorer.score_texts(prompts, plain))) >= 36
    hist = reports.reward_history(store)
    assert hist[0]["version"] == 1
    assert hist[0]["heldout_accuracy"] == res["metrics"]["heldout_accuracy"]
    assert hist[0]["mean_p_chosen"] is not None and hist[0]["ece"] is not None


def test_no_pickle_or_torch_load_in_reward_code():
    for mod in (reward_model, reward_data):
        src = Path(mod.__file__).read_text()
        assert not re.search(r"torch\.load|import pickle|pickle\.", src), mod.__name__


def test_score_ids_is_padding_invariant_and_matches_score_texts(store, tiny_model_dir):
    seed_rankings(store, 12)
    runtime = make_runtime(store, tiny_model_dir, cfg=NO_GATE)
    reward_model.train_reward(runtime)
    scorer = reward_model.load_reward(runtime)
    enc = reward_scoring.Encoder(runtime.tokenizer, 320)
    seqs = [enc("hello world", "yes the sea"), enc("write a poem", "no")]
    singles = torch.cat([scorer.score_ids(torch.tensor([s]), torch.ones(1, len(s)))
                         for s in seqs])
    T, pad = max(map(len, seqs)), runtime.tokenizer.pad_token_id
    left = torch.tensor([[pad] * (T - len(s)) + s for s in seqs])
    left_mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    assert torch.allclose(scorer.score_ids(left, left_mask), singles, atol=1e-5)
    texts = scorer.score_texts(["hello world", "write a poem"], ["yes the sea", "no"])
    assert texts == pytest.approx(singles.tolist(), abs=1e-5)
    assert runtime.model.active_adapter == "policy"  # scoring leaves the policy active


def test_incremental_update_warm_starts_and_replays(store, tiny_model_dir):
    seed_rankings(store, 40)
    runtime = make_runtime(store, tiny_model_dir, cfg=LEARN)
    first = reward_model.train_reward(runtime)
    old_pairs = reward_data.load_pairs(annotation.training_pairs(store))
    v1 = reward_model.load_reward(runtime)
    v1_scores = v1.score_texts(["p", "q"], ["yes sea", "the dog"])
    seed_rankings(store, 12, start=40)
    second = reward_model.train_reward(runtime, config=FINE_TUNE)
    c = second["counts"]
    assert second["status"] == "promoted", second["reason"]
    assert store.current_version("reward")["parent"] == 1
    assert c["trained_on_after_pair_id"] == first["counts"]["max_pair_id"]
    assert c["new_pairs"] > 0 and c["replay_pairs"] > 0
    assert c["new_pairs"] + c["replay_pairs"] == c["train_pairs"] < first["counts"]["train_pairs"]
    # Fresh accuracy of the serving version was measured before it was replaced.
    assert second["metrics"]["current_fresh_accuracy"] is not None
    assert second["metrics"]["current_fresh_strict_pairs"] == c["fresh_strict"]
    assert accuracy_on(reward_model.load_reward(runtime), old_pairs) >= MIN_ACCURACY
    # A scorer held from before keeps scoring as v1, without evicting v2 from the serving slot.
    assert v1.score_texts(["p", "q"], ["yes sea", "the dog"]) == pytest.approx(v1_scores, abs=1e-6)
    assert runtime.loaded["reward"] == 2 and v1.adapter_name == "reward@v1"
    with pytest.raises(RewardDataError, match="no new training pairs"):
        reward_model.train_reward(runtime)


def test_gate_rejects_worse_candidate_and_current_keeps_serving(store, tiny_model_dir):
    seed_rankings(store, 40)
    runtime = make_runtime(store, tiny_model_dir, cfg=LEARN)
    assert reward_model.train_reward(runtime)["status"] == "promoted"
    before = reward_model.load_reward(runtime).score_texts(["p"], ["yes the sea"])
    seed_rankings(store, 40, start=40, flip_train=True)  # annotators now contradict themselves
    res = reward_model.train_reward(runtime, config=replace(FAST, replay_ratio=0.0, epochs=8))
    assert res["status"] == "rejected", res
    assert "tolerance" in res["reason"] and "v1 keeps serving" in res["reason"]
    assert store.get_version("reward", 2)["status"] == "rejected"
    assert Path(store.get_version("reward", 2)["path"], "score_head.safetensors").exists()
    scorer = reward_model.load_reward(runtime)
    assert scorer.version == 1 and store.current_version("reward")["version"] == 1
    assert scorer.score_texts(["p"], ["yes the sea"]) == pytest.approx(before, abs=1e-6)
    assert [h["status"] for h in reports.reward_history(store)] == ["promoted", "rejected"]
    assert reward_model.load_reward(runtime, version=2).adapter_name == "reward@v2"
    assert "reward_candidate" not in runtime.model.peft_config


# -- bad input --------------------------------------------------------------------------------
def test_too_few_pairs_says_how_many_are_needed(store, tiny_model_dir):
    seed_rankings(store, 2)
    runtime = make_runtime(store, tiny_model_dir, cfg=replace(FAST, min_pairs=50))
    with pytest.raises(RewardDataError, match=r"at least 50 needed \(RewardConfig.min_pairs\)"):
        reward_model.train_reward(runtime)
    assert runtime._model is None and store.list_versions("reward") == []  # no model touched


def test_all_ties_is_refused(store, tiny_model_dir):
    seed_rankings(store, 6, ties_only=True)
    runtime = make_runtime(store, tiny_model_dir)
    with pytest.raises(RewardDataError, match="are ties"):
        reward_model.train_reward(runtime)


def test_missing_or_corrupt_version_dir_keeps_previous_serving(store, tiny_model_dir):
    seed_rankings(store, 12)
    runtime = make_runtime(store, tiny_model_dir, cfg=NO_GATE)
    reward_model.train_reward(runtime)
    good = reward_model.load_reward(runtime)
    expected = good.score_texts(["p"], ["yes"])
    v1 = Path(good.path)
    bad = v1.parent / "v0002"
    bad.mkdir()
    for f in ("version.json", "score_head.safetensors"):
        (bad / f).write_bytes((v1 / f).read_bytes())
    (bad / "reward").mkdir()
    config = (v1 / "reward" / "adapter_config.json").read_text()
    (bad / "reward" / "adapter_config.json").write_text(config)
    data = (v1 / "reward/adapter_model.safetensors").read_bytes()
    (bad / "reward" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    store.add_version("reward", 2, status="promoted", path=str(bad))
    with pytest.raises(models.ModelLoadError, match="corrupt.*previous version keeps serving"):
        reward_model.load_reward(runtime)
    store.add_version("reward", 3, status="promoted", path=str(v1.parent / "v0003"))
    with pytest.raises(models.ModelLoadError, match="directory is missing"):
        reward_model.load_reward(runtime)
    assert runtime.loaded["reward"] == 1
    assert good.score_texts(["p"], ["yes"]) == pytest.approx(expected, abs=1e-6)


# -- jobs and a separate reward base -------------------------------------------------------------
def test_train_job_through_the_queue(store, tiny_model_dir):
    seed_rankings(store, 12)
    runtime = make_runtime(store, tiny_model_dir, cfg=RewardConfig())
    job_id = jobs.enqueue(store, "train_reward", {"lr": 1e-2, "epochs": 3})
    job = run_one(runtime, "w1")
    assert job["status"] == "done", job["error"]
    assert job["result"]["version"] == 1 and job["progress"] == 1.0
    assert store.get_version("reward", 1)["job_id"] == job_id
    assert store.get_version("reward", 1)["config"]["lr"] == 1e-2
    assert store.metric_series("reward_train", "loss")


def test_separate_sequence_classifier_reward_base(store, tiny_model_dir):
    seed_rankings(store, 40)
    runtime = make_runtime(store, tiny_model_dir, cfg=LEARN, reward_model=str(tiny_model_dir))
    res = reward_model.train_reward(runtime)
    assert res["status"] == "promoted", res["reason"]
    assert_learned(res["metrics"])
    scorer = reward_model.load_reward(runtime)
    assert not scorer.shares_base and runtime._model is None  # the policy base never loaded
    assert json.loads(Path(scorer.path, "version.json").read_text())["shares_base"] is False


def test_next_round_reuses_the_serving_versions_scores(store, tiny_model_dir, monkeypatch):
    """Round 2 scores, for the serving v1, only the responses v1 was not evaluated on as round
    1's candidate; the reused scores are what the published v1 gives."""
    seed_rankings(store, 40)
    runtime = make_runtime(store, tiny_model_dir, cfg=LEARN)
    assert reward_model.train_reward(runtime)["status"] == "promoted"
    cache = runtime.reward_score_cache
    seen_v1 = {k[2] for k in cache if k[0] == 1}
    seed_rankings(store, 12, start=40, seed=1)
    scored, real = [], reward_train.score_sequences

    def counting(bb, adapter, head, seqs, batch_size=16, prefix_cache=True):
        scored.append((adapter, len(seqs)))
        return real(bb, adapter, head, seqs, batch_size, prefix_cache)
    monkeypatch.setattr(reward_train, "score_sequences", counting)
    res = reward_model.train_reward(runtime, config=FINE_TUNE)
    assert res["version"] == 2
    round2 = {k[2] for k in cache if k[0] == 2}  # the candidate's: every evaluated response
    new = round2 - seen_v1
    assert new and round2 & seen_v1
    assert scored == [("reward", len(new)), ("reward_candidate", len(round2))]
    assert {k[0] for k in cache} <= {1, 2}
    # the reused v1 scores equal the published v1's own
    reused = sorted(round2 & seen_v1)
    rows = {r["id"]: r for r in store.rows(
        "SELECT r.id, r.text, p.text AS prompt FROM responses r JOIN prompts p "
        "ON p.id = r.prompt_id")}
    v1 = reward_model.load_reward(runtime, version=1)
    fresh = v1.score_texts([rows[r]["prompt"] for r in reused], [rows[r]["text"] for r in reused])
    assert fresh == pytest.approx([cache[(1, FINE_TUNE.max_length, r)] for r in reused], abs=1e-5)


def test_length_chunks_cut_a_step_where_padding_costs_more_than_a_pass():
    """Worked by hand: cost = sum over passes of rows x longest + overhead."""
    chunks = reward_data.length_chunks
    # one length: one pass whatever the overhead (a split saves nothing)
    assert chunks([10, 10, 10], 0) == [[0, 1, 2]]
    # 3 x 20 + one 100: together 4 x 100 + 64 = 464; apart 3 x 20 + 64 + 100 + 64 = 288
    assert chunks([100, 20, 20, 20], 64) == [[1, 2, 3], [0]]
    # overhead 300: together 400 + 300 = 700 < apart 60 + 100 + 600 = 760
    assert chunks([100, 20, 20, 20], 300) == [[1, 2, 3, 0]]
    # lengths 10, 12, 30, 32 at overhead 8: {10,12} {30,32} = 24 + 8 + 64 + 8 = 104; one pass
    # 128 + 8 = 136; four passes 10+12+30+32 + 32 = 116; {10,12,30} {32} = 90 + 8 + 32 + 8 = 138
    assert chunks([30, 10, 32, 12], 8) == [[1, 3], [0, 2]]
    # every row is in exactly one pass, shortest first
    lengths = [7, 3, 50, 3, 9, 48, 20]
    got = chunks(lengths, 16)
    assert sorted(i for c in got for i in c) == list(range(len(lengths)))
    flat = [lengths[i] for c in got for i in c]
    assert flat == sorted(flat)
    assert chunks([], 64) == []
