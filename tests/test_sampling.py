"""Batch sampling: tokenizer set-up, generation, dedupe, the sample_batch job, readiness."""
from __future__ import annotations

from dataclasses import replace

import time
from pathlib import Path

import pytest
import torch

from rlhf_core.worker.run import run_one
from rlhf_core import models
from rlhf_core.config import SamplingConfig
from rlhf_core.data import annotation, jobs
from rlhf_core.sampling import (
    Sample,
    _to_sample,
    chat_prompts,
    dedupe,
    generate,
    sample_distinct,
    stop_token_ids,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = models.load_tokenizer(str(tiny_model_dir))
    model = models.load_causal_lm(str(tiny_model_dir), tok)
    return model, tok


def test_tokenizer_pads_left_with_a_token_that_is_not_eos(tiny, tiny_model_dir):
    _, tok = tiny
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    # The saved checkpoint pads with EOS; the loader must not keep that.
    from transformers import AutoTokenizer
    raw = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert raw.pad_token_id == raw.eos_token_id
    enc = tok(chat_prompts(tok, ["hi", "write a short poem about the sea please"]),
              return_tensors="pt", padding=True, add_special_tokens=False)
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][0, -1] == 1
    assert enc["input_ids"][0, 0] == tok.pad_token_id
    assert enc["attention_mask"][1].all()


def test_tokenizer_gets_new_pad_when_no_unk(tmp_path, tiny_model_dir):
    """No usable unk: a dedicated pad token is added and the embeddings grow to match."""
    from transformers import AutoTokenizer
    raw = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    raw.unk_token = raw.eos_token
    raw.save_pretrained(tmp_path)
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / f).write_bytes((Path(tiny_model_dir) / f).read_bytes())
    tok = models.load_tokenizer(str(tmp_path))
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    model = models.load_causal_lm(str(tmp_path), tok)
    assert model.get_input_embeddings().num_embeddings >= len(tok)
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_chat_template_applied(tiny):
    _, tok = tiny
    (text,) = chat_prompts(tok, ["What is RLHF?"])
    assert text == "<|im_start|>user\nWhat is RLHF?<|im_end|>\n<|im_start|>assistant\n"


def test_missing_chat_template_is_refused(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer
    raw = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    raw.chat_template = None
    raw.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(models.ModelLoadError, match="chat template"):
        models.load_tokenizer(str(tmp_path))


def test_embedded_model_dir_prefers_the_workspace_copy_then_the_shared_one(tmp_path,
                                                                           monkeypatch):
    """Where the embedded model's converted copy is found (no conversion runs here: the copies
    are made by hand, a config.json marks one as complete)."""
    from rlhf_core.config import embedded_gguf_path
    shared = tmp_path / "user-cache"
    monkeypatch.setenv("RLHF_MODEL_CACHE", str(shared))
    st = embedded_gguf_path().stat()
    copy = shared / f"smollm2-135m-instruct-{st.st_size}-{int(st.st_mtime)}"
    copy.mkdir(parents=True)
    (copy / "config.json").write_text("{}")
    assert models.embedded_model_dir(tmp_path / "new-ws") == copy  # any new workspace
    old_ws = tmp_path / "old-ws"
    own = old_ws / "cache" / "base" / "smollm2-135m-instruct"
    own.mkdir(parents=True)
    (own / "config.json").write_text("{}")
    assert models.embedded_model_dir(old_ws) == own  # a workspace's own copy wins
    monkeypatch.setenv("RLHF_MODEL_CACHE", "off")
    assert models.shared_model_cache() is None
    monkeypatch.delenv("RLHF_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.shared_model_cache() == tmp_path / "xdg" / "rlhf-loop" / "models"


def test_resolve_model_source(tmp_path, tiny_model_dir):
    assert models.resolve_model_source(str(tiny_model_dir), tmp_path) == str(tiny_model_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelLoadError, match="config.json"):
        models.resolve_model_source(str(tmp_path / "empty"), tmp_path)
    assert models.resolve_model_source("org/model", tmp_path) == "org/model"
    with pytest.raises(models.ModelLoadError):
        models.resolve_model_source("./nowhere/at/all", tmp_path)


def test_k_responses_with_lengths_and_finish_reasons(tiny):
    model, tok = tiny
    cfg = SamplingConfig(k=3, max_new_tokens=6, batch_size=4)
    fractions = []
    out = generate(model, tok, ["hello world", "write a poem"], n=3, cfg=cfg, seed=0,
                   progress=fractions.append)
    assert [len(r) for r in out] == [3, 3]
    for samples in out:
        for s in samples:
            assert s.finish_reason in {"stop", "length"}
            assert 1 <= s.n_tokens <= cfg.max_new_tokens
            if s.finish_reason == "length":
                assert s.n_tokens == cfg.max_new_tokens
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)  # 6 sequences in 2 chunks


def test_to_sample_detects_stop_token(tiny):
    model, tok = tiny
    stops = stop_token_ids(tok, model)
    assert tok.eos_token_id in stops and tok.pad_token_id not in stops
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    s = _to_sample(tok, ids + [tok.eos_token_id, tok.pad_token_id, tok.pad_token_id], stops)
    assert s == Sample("hello world", len(ids) + 1, "stop", ids + [tok.eos_token_id])
    s = _to_sample(tok, ids, stops)
    assert s == Sample("hello world", len(ids), "length", ids)


def test_seeded_sampling_is_reproducible(tiny):
    model, tok = tiny
    cfg = SamplingConfig(k=2, max_new_tokens=8)
    run = lambda seed: [[s.text for s in r] for r in  # noqa: E731
                        generate(model, tok, ["hello", "python code"], n=2, cfg=cfg, seed=seed)]
    a, b, c = run(5), run(5), run(6)
    assert a == b
    assert a != c


def test_dedupe_collapses_identical_texts():
    samples = [Sample("Hello  world", 3, "stop"), Sample("hello world", 3, "stop"),
               Sample("other", 2, "length"), Sample(" HELLO WORLD ", 4, "stop")]
    kept, dropped = dedupe(samples)
    assert [s.text for s in kept] == ["Hello  world", "other"] and dropped == 2


def test_sample_distinct_collapses_when_model_repeats_itself(tiny):
    """A near-greedy model keeps producing the same text: re-sampling gives up, dupes collapse."""
    model, tok = tiny
    cfg = SamplingConfig(k=3, max_new_tokens=4, temperature=1e-6, dedupe_retries=1)
    (samples,) = sample_distinct(model, tok, ["hello world"], cfg=cfg, seed=0)
    assert len(samples) == 1
    cfg = SamplingConfig(k=3, max_new_tokens=8, temperature=1.5)
    (samples,) = sample_distinct(model, tok, ["hello world"], cfg=cfg, seed=0)
    assert len({" ".join(s.text.lower().split()) for s in samples}) == len(samples) == 3


# -- the sample_batch job ------------------------------------------------------------------
@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    from rlhf_core.labeling import batch as batch_jobs  # noqa: F401  registers sample_batch
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    store, cfg = open_workspace(tmp_path / "ws", model=str(tiny_model_dir),
                                **{"sampling.max_new_tokens": 8, "sampling.k": 3})
    store.add_prompts([{"text": t} for t in ("hello world", "write a short poem",
                                             "python code please", "count to ten")],
                      source="test")
    yield store, cfg, Runtime(store, cfg, cpu=True)
    store.close()


def test_sample_batch_job_creates_items_with_provenance(workspace):
    store, cfg, runtime = workspace
    job_id = jobs.enqueue(store, "sample_batch", {"prompts_per_batch": 3, "seed": 1,
                                                  "ab_fraction": 0.0})
    row = run_one(runtime, "w")
    assert row["id"] == job_id and row["status"] == "done", row["error"]
    res = row["result"]
    assert res["policy_version"] == 0 and res["ab_items"] == 0 and res["items"] >= 1
    items = store.rows("SELECT * FROM items")
    assert len(items) == res["items"] and {i["kind"] for i in items} == {"label"}
    assert len({i["prompt_id"] for i in items}) == len(items)
    batch = store.one("SELECT * FROM batches")
    assert batch["job_id"] == job_id and batch["policy_version"] == 0 and batch["k"] == 3
    responses = store.rows("SELECT * FROM responses")
    assert len(responses) == res["responses"]
    import json
    for r in responses:
        assert r["policy_version"] == 0
        assert r["finish_reason"] in {"stop", "length"} and 1 <= r["n_tokens"] <= 8
        settings = json.loads(r["settings"])
        assert settings["max_new_tokens"] == 8 and settings["k"] == 3
        assert settings["policy_version"] == 0 and "temperature" in settings
    assert store.metric_series("sampling", "responses")[0]["value"] == res["responses"]
    item = annotation.next_item(store, "alice")  # rankable straight away
    assert 2 <= len(item["responses"]) <= 3


def test_chunk_bounds():
    from rlhf_core.labeling.batch import chunk_bounds
    assert chunk_bounds(4, 2, 2) == [(0, 2), (2, 4)]
    assert chunk_bounds(8, 1, 4) == [(0, 1), (1, 5), (5, 8)]
    assert chunk_bounds(1, 1, 4) == [(0, 1)] and chunk_bounds(0, 1, 4) == []


def test_sample_batch_items_are_rankable_before_the_batch_is_done(workspace):
    """Items stream in, one generate() call's worth of prompts at a time (batch_size 6 / k 3
    = 2 prompts): while the job still reports progress, the first items can be ranked. With
    nothing to rank anywhere, the first call samples one prompt alone."""
    from rlhf_core.labeling.batch import sample_batch
    store, cfg, runtime = workspace
    seen = []

    class Watch:  # the job's reporter: at each progress report, what could an annotator get?
        job_id = None

        def progress(self, fraction, message=""):
            seen.append(store.scalar("SELECT COUNT(*) FROM items WHERE status = 'ready'"))

        def metrics(self, *a, **kw):
            pass
    sampling = replace(cfg.sampling, prompts_per_batch=4, batch_size=6)
    res = sample_batch(runtime, sampling, replace(cfg.loop, ab_fraction=0.0), reporter=Watch(),
                       seed=1)
    assert res["items"] == 4 and store.scalar("SELECT COUNT(*) FROM batches") == 1
    assert seen == [0, 1, 3, 4]  # one item after the first (one-prompt) call
    assert annotation.next_item(store, "alice")["batch_id"] == res["batch_id"]
    seen.clear()  # items are open now: whole calls from the start
    sample_batch(runtime, sampling, replace(cfg.loop, ab_fraction=0.0), reporter=Watch(), seed=2)
    assert seen == [4, 6, 8]


def test_sample_batch_at_v0_never_makes_ab_items(workspace):
    store, cfg, runtime = workspace
    jobs.enqueue(store, "sample_batch", {"prompts_per_batch": 2, "seed": 2, "k": 2,
                                         "ab_fraction": 1.0})
    row = run_one(runtime, "w")
    assert row["status"] == "done", row["error"]
    assert row["result"]["ab_items"] == 0
    assert store.scalar("SELECT COUNT(*) FROM items WHERE kind = 'ab'") == 0


def publish_fake_policy_v1(store, runtime):
    """Policy v1 = the fresh (identity) LoRA adapter, published like a PPO round would."""
    from rlhf_core.checkpoints import publish
    path = publish(runtime.workspace, "policy", 1,
                   lambda tmp: models.save_adapter(runtime.model, "policy", tmp), {"fake": True},
                   recorded=store.get_version)
    store.add_version("policy", 1, status="published", path=str(path), parent=0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_ab_items_mix_current_policy_and_reference(workspace, k):
    store, cfg, runtime = workspace
    publish_fake_policy_v1(store, runtime)
    jobs.enqueue(store, "sample_batch", {"prompts_per_batch": 2, "seed": 3, "k": k,
                                         "ab_fraction": 0.5, "temperature": 1.5})
    row = run_one(runtime, "w")
    assert row["status"] == "done", row["error"]
    assert row["result"]["policy_version"] == 1 and row["result"]["ab_items"] == 1
    (ab,) = store.rows("SELECT * FROM items WHERE kind = 'ab'")
    assert ab["selection"] == "ab:v1-vs-v0"
    versions = [r["policy_version"] for r in store.rows(
        "SELECT policy_version FROM responses WHERE item_id = ? ORDER BY position", [ab["id"]])]
    k_new = (k + 1) // 2
    assert versions == [1] * k_new + [0] * (k - k_new)
    (label,) = store.rows("SELECT id FROM items WHERE kind = 'label'")
    assert {r["policy_version"] for r in store.rows(
        "SELECT policy_version FROM responses WHERE item_id = ?", [label["id"]])} == {1}


def test_sample_batch_without_prompts_fails_cleanly(tmp_path, tiny_model_dir):
    from rlhf_core.labeling import batch as batch_jobs  # noqa: F401
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    store, cfg = open_workspace(tmp_path / "empty", model=str(tiny_model_dir))
    jobs.enqueue(store, "sample_batch", {"prompts_per_batch": 2, "prompt_ids": []})
    row = run_one(Runtime(store, cfg, cpu=True), "w")
    assert row["status"] == "failed" and "no prompts" in row["error"]


def test_baseline_version_rules(store):
    from rlhf_core.labeling.batch import baseline_version
    assert baseline_version(store, "reference", 0) is None
    assert baseline_version(store, "previous", 0) is None
    assert baseline_version(store, "reference", 3) == 0
    assert baseline_version(store, "previous", 3) == 2
    assert baseline_version(store, "previous", 1) == 0
    store.add_version("policy", 1, status="published")
    assert baseline_version(store, "v1", 3) == 1
    assert baseline_version(store, "v2", 3) == 0  # never published: fall back to the reference
    assert baseline_version(store, "v3", 3) == 0  # not older than the current version
    with pytest.raises(ValueError, match="unknown A/B baseline"):
        baseline_version(store, "best", 3)


def ensure_ready(store, min_ready: int):
    """The loop's keep-items-ready rule with `min_ready`: the sample_batch job it queued, if any."""
    from rlhf_core.config import to_dict
    from rlhf_core.worker.loop import loop_tick
    from rlhf_core.workspace import apply_overrides, read_config
    cfg = apply_overrides(read_config(store), {"sampling.min_ready_items": min_ready})
    store.set_setting("config", to_dict(cfg))
    kinds = {j: store.scalar("SELECT kind FROM jobs WHERE id = ?", [j]) for j in loop_tick(store)}
    queued = [j for j, k in kinds.items() if k == "sample_batch"]
    if queued:
        return queued[0]
    return store.scalar("SELECT id FROM jobs WHERE kind = 'sample_batch' AND status = 'queued'")


def test_ensure_ready_queues_one_job_below_min(store):
    assert ensure_ready(store, 2) is None  # no prompts: nothing to sample
    store.add_prompts([{"text": f"p{i}"} for i in range(3)], source="t")
    annotation.create_batch(store, policy_version=0, k=2, items=[
        {"prompt_id": i, "responses": [{"text": "a"}, {"text": "b"}]} for i in (1, 2, 3)])
    assert ensure_ready(store, 3) is None  # enough items ready
    assert store.scalar("SELECT COUNT(*) FROM jobs") == 0
    job = ensure_ready(store, 4)
    assert job is not None and ensure_ready(store, 4) == job
    rows = store.rows("SELECT kind, status FROM jobs")
    assert rows == [{"kind": "sample_batch", "status": "queued"}]


def test_ensure_ready_counts_items_needing_rankings(store):
    store.add_prompts([{"text": "p"}], source="t")
    annotation.create_batch(store, policy_version=0, k=2, items=[
        {"prompt_id": 1, "responses": [{"text": "a"}, {"text": "b"}]}])
    assert ensure_ready(store, 1) is None
    item = annotation.next_item(store, "alice")
    annotation.submit_ranking(store, annotator="alice", item_id=item["id"], token=item["token"],
                              submission_key="k", tiers=[[r["id"]] for r in item["responses"]])
    assert ensure_ready(store, 1) is not None  # the only item is fully ranked


# -- the embedded model -----------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_samples_and_cache_loads_fast(embedded_model_dir, tmp_path):
    cache = Path(embedded_model_dir)
    assert (cache / "config.json").exists() and (cache / "model.safetensors").exists()
    assert not list(cache.glob("*.gguf"))
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    t0 = time.perf_counter()
    again = models.resolve_model_source("embedded", tmp_path / "a-new-workspace")
    assert again == str(cache) and time.perf_counter() - t0 < 1.0  # the shared copy, at once
    assert not (tmp_path / "a-new-workspace").exists()  # nothing converted into it
    t0 = time.perf_counter()
    tok = models.load_tokenizer(again)
    model = models.load_causal_lm(again, tok)
    assert time.perf_counter() - t0 < 20
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    cfg = SamplingConfig(k=2, max_new_tokens=16, temperature=0.9)
    out = sample_distinct(model, tok, ["What is the capital of France?", "Say hello."],
                          cfg=cfg, seed=0)
    assert len(out) == 2
    for samples in out:
        assert 1 <= len(samples) <= 2
        for s in samples:
            assert s.text.strip() and s.finish_reason in {"stop", "length"}
            assert s.n_tokens <= 16
    with torch.no_grad():
        logits = model(**tok(["Hello"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_system_prompt_goes_before_every_prompt(tiny_model_dir, tmp_path):
    from rlhf_core.sampling import chat_ids, chat_prompts
    plain = models.load_tokenizer(str(tiny_model_dir))
    brief = models.load_tokenizer(str(tiny_model_dir), system_prompt="Be brief.")
    (text,) = chat_prompts(brief, ["hi"])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert chat_prompts(plain, ["hi"]) == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    assert chat_ids(brief, "hi") == brief(text, add_special_tokens=False)["input_ids"]
    # a template that refuses a system turn: the system text opens the user turn instead
    strict = tmp_path / "strict"
    import shutil
    shutil.copytree(tiny_model_dir, strict)
    tok = models.load_tokenizer(str(strict), system_prompt="Be brief.")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert chat_prompts(tok, ["hi"]) == [
        "<|im_start|>user\nBe brief.\n\nhi<|im_end|>\n<|im_start|>assistant\n"]


def test_older_workspaces_keep_their_prompt_format(tmp_path):
    from rlhf_core.config import DEFAULT_SYSTEM_PROMPT
    from rlhf_core.workspace import CONFIG_KEY, open_workspace, read_config
    store, cfg = open_workspace(tmp_path / "new")
    assert cfg.system_prompt == DEFAULT_SYSTEM_PROMPT
    saved = store.get_setting(CONFIG_KEY)
    del saved["system_prompt"]  # as a workspace saved before the setting existed
    store.set_setting(CONFIG_KEY, saved)
    assert read_config(store).system_prompt == ""
    store.close()
    store, cfg = open_workspace(tmp_path / "new", system_prompt="Answer in French.")
    assert cfg.system_prompt == "Answer in French." and read_config(store).system_prompt == (
        "Answer in French.")
    store.close()


def test_a_batch_job_without_a_seed_samples_the_same_in_two_workspaces(tmp_path, tiny_model_dir):
    """Without a seed in its params a batch is seeded from its job's number, not the clock:
    two workspaces with the same history sample the same batch (what `rlhf simulate --seed`
    needs to compare algorithms from the same first batch); the next job samples another."""
    from rlhf_core.labeling import batch as batch_jobs  # noqa: F401  registers sample_batch
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    texts = []
    for name in ("a", "b"):
        store, cfg = open_workspace(tmp_path / name, model=str(tiny_model_dir),
                                    **{"sampling.max_new_tokens": 8, "sampling.k": 2})
        store.add_prompts([{"text": f"question {i}: say something"} for i in range(12)],
                          source="test", heldout_fraction=0.0)
        runtime = Runtime(store, cfg, cpu=True)
        for _ in range(2):
            jobs.enqueue(store, "sample_batch", {"prompts_per_batch": 3, "ab_fraction": 0.0})
            assert run_one(runtime, "w")["status"] == "done"
        rows = store.rows("SELECT i.batch_id, p.text AS prompt, r.text FROM responses r "
                          "JOIN items i ON i.id = r.item_id JOIN prompts p ON p.id = i.prompt_id "
                          "ORDER BY r.id")
        texts.append(rows)
        store.close()
    assert texts[0] == texts[1] and len(texts[0]) == 12
    first = [(r["prompt"], r["text"]) for r in texts[0] if r["batch_id"] == 1]
    second = [(r["prompt"], r["text"]) for r in texts[0] if r["batch_id"] == 2]
    assert first != second


def test_eval_policy_samples_a_version_once_per_prompts_and_settings(tmp_path, tiny_model_dir,
                                                                     monkeypatch):
    """The reference is judged every round: its held-out samples come from the first round's
    sampling (the same seeds and settings give the same answers), a new seed samples again."""
    from rlhf_core.labeling import heldout
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    store, cfg = open_workspace(tmp_path / "ws", model=str(tiny_model_dir),
                                **{"sampling.max_new_tokens": 6})
    store.add_prompts([{"text": t} for t in ("hello world", "count to ten")], source="test",
                      heldout_fraction=1.0)
    runtime = Runtime(store, cfg, cpu=True)
    calls, real = [], heldout.generate

    def counting(*a, **kw):
        calls.append(kw["seed"])
        return real(*a, **kw)
    monkeypatch.setattr(heldout, "generate", counting)

    class Quiet:
        def progress(self, *a):
            pass
    first = heldout.eval_policy(runtime, cfg.sampling, reporter=Quiet(), policy_version=0)
    assert calls == [1234]  # policy v0 and baseline v0: one sampling
    again = heldout.eval_policy(runtime, cfg.sampling, reporter=Quiet(), policy_version=0)
    assert calls == [1234] and again["samples"] == first["samples"]
    runtime.eval_samples_cache.clear()  # what a fresh worker would sample: the same answers
    fresh = heldout.eval_policy(runtime, cfg.sampling, reporter=Quiet(), policy_version=0)
    assert fresh["samples"] == first["samples"] and calls == [1234, 1234]
    heldout.eval_policy(runtime, cfg.sampling, reporter=Quiet(), policy_version=0, seed=7)
    assert calls == [1234, 1234, 7]
    store.close()


def test_eval_policy_reports_the_judged_versions_kl_from_the_reference(tmp_path, tiny_model_dir,
                                                                       monkeypatch):
    """`kl` = mean over the judged version's held-out samples of sum_t log p_v - log p_ref at
    the sampling temperature, checked against plain float32 forwards of each whole sequence;
    0 for v0; computed once per version and settings; under bf16 autocast (the training
    precision where native) in bf16, within 0.005 nats of float32's."""
    from rlhf_core.labeling import heldout
    from rlhf_core.sampling import chat_ids
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    store, cfg = open_workspace(tmp_path / "ws", model=str(tiny_model_dir), mixed_precision="no",
                                **{"sampling.max_new_tokens": 6, "sampling.temperature": 0.7})
    store.add_prompts([{"text": t} for t in ("hello world", "count to ten", "a poem")],
                      source="test", heldout_fraction=1.0)
    runtime = Runtime(store, cfg, cpu=True)
    model = runtime.model
    runtime.ensure_fresh_adapter("policy")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that differs from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name and ".policy." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    monkeypatch.setattr(runtime, "use_policy", lambda v=None: model.set_adapter("policy") or "policy")
    calls = []
    real = heldout.kl_from_reference
    monkeypatch.setattr(heldout, "kl_from_reference", lambda *a: calls.append(a[1]) or real(*a))

    class Quiet:
        def progress(self, *a):
            pass
    res = heldout.eval_policy(runtime, cfg.sampling, reporter=Quiet(), policy_version=1)
    samples = runtime.eval_samples_cache[next(k for k in runtime.eval_samples_cache
                                              if k[0] == 1)]
    tok, T = runtime.tokenizer, cfg.sampling.temperature

    def seq_logp(prompt, ids):
        q = chat_ids(tok, prompt)
        logits = model(input_ids=torch.tensor([q + ids])).logits[0].float()  # (L,V)
        logp = torch.log_softmax(logits[len(q) - 1:len(q) + len(ids) - 1] / T, dim=-1)
        return logp.gather(-1, torch.tensor(ids)[:, None]).sum().item()
    want = []
    with torch.no_grad():
        for prompt, per in zip(["hello world", "count to ten", "a poem"], samples):
            for s in per:
                model.set_adapter("policy")
                lp = seq_logp(prompt, s.ids)
                with model.disable_adapter():
                    want.append(lp - seq_logp(prompt, s.ids))
    assert len(want) == 6 and abs(sum(want) / 6) > 1e-3  # the policy really differs
    assert res["kl"] == pytest.approx(sum(want) / 6, abs=1e-4)
    heldout.eval_policy(runtime, cfg.sampling, reporter=Quiet(), policy_version=1)
    assert calls == [1]  # once per version and settings
    from tests.test_mixed_precision import MatmulDtypes
    runtime.device = replace(runtime.device, mixed_precision="bf16")
    spy = MatmulDtypes(model)
    with runtime.lock:
        bf16 = heldout.kl_from_reference(runtime, 1, ["hello world", "count to ten", "a poem"],
                                         samples, cfg.sampling)
    spy.close()
    assert spy.seen == {torch.bfloat16}
    assert bf16 != res["kl"]  # it did run in bf16, and bf16's rounding moved it only a little
    assert bf16 == pytest.approx(sum(want) / 6, abs=0.005)
    assert heldout.eval_policy(runtime, cfg.sampling, reporter=Quiet(),
                               policy_version=0)["kl"] == 0.0
    store.close()
