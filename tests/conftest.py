"""Shared fixtures: a real SQLite workspace and tiny random models saved to disk,
so every test goes through the real loading code without a network."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's numerics (ratio 1 on PPO's first minibatch to 1e-5, cached = uncached forwards)
# are float32's: `mixed_precision=auto` reads accelerate's variable, so every runtime here and
# in the workers the tests start computes in float32. tests/test_mixed_precision.py runs bf16.
os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "no")
# The converted embedded model goes to a cache of this test session (workers the tests start
# inherit it), not to the user's ~/.cache; set RLHF_MODEL_CACHE to reuse a conversion.
_SESSION_MODEL_CACHE = None
if "RLHF_MODEL_CACHE" not in os.environ:
    _SESSION_MODEL_CACHE = tempfile.mkdtemp(prefix="rlhf-test-models-")
    os.environ["RLHF_MODEL_CACHE"] = _SESSION_MODEL_CACHE


def pytest_unconfigure(config):
    if _SESSION_MODEL_CACHE:
        shutil.rmtree(_SESSION_MODEL_CACHE, ignore_errors=True)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog", "hello world how are you today",
    "write a short poem about the sea", "yes no maybe good bad short long answer",
    "python code def return print list dict", "one two three four five six seven eight nine ten",
]


def build_tiny_model(path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A byte-level BPE tokenizer and a random 2-layer Llama, saved like a real checkpoint."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread, and the machine's cores are shared (measured: 16
    new tokens took 25-50 s with 2 threads beside other jobs, 3 s with 1). Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def store(tmp_path):
    from rlhf_core.data.store import Store
    s = Store(tmp_path / "ws" / "rlhf.db")
    yield s
    s.close()


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2 converted once per test session (or from RLHF_TEST_CACHE)."""
    from rlhf_core.models import resolve_model_source
    cache = os.environ.get("RLHF_TEST_CACHE")
    ws = Path(cache) if cache else tmp_path_factory.mktemp("embedded-ws")
    return Path(resolve_model_source("embedded", ws))


def publish_fresh_reward(runtime, version: int, parent: int | None = None):
    """Publish an untrained reward adapter + random head as a promoted version: enough to score."""
    from rlhf_core.reward import model as reward_scoring
    from rlhf_core.reward import train as reward_train
    bb = reward_scoring.backbone(runtime)
    head = reward_train.prepare_candidate(runtime, bb, None, runtime.config.reward, version)
    manifest = {"kind": "reward", "version": version, "status": "promoted", "config": {},
                "metrics": {}, "counts": {}}
    path = reward_train.publish_candidate(runtime, bb, head, version, manifest)
    bb.model.delete_adapter(reward_scoring.CANDIDATE)
    runtime.data.add_version("reward", version, status="promoted", path=str(path), parent=parent)
    return path
