"""``selfalign bench eval`` on a model that is not ``models/base``: a tiny random Gemma 3 whose tokenizer adds
its BOS itself (Gemma 3 270M's case), window smaller than every TruthfulQA prompt. Our TruthfulQA MC1/MC2
equal lm-eval HFLM's on the same items because both sides score the same BOS-led token sequences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = ROOT / "eval" / "tasks"
WINDOW = 6


@pytest.fixture(scope="module")
def bos_gemma_dir(tmp_path_factory) -> Path:
    """Tiny random Gemma 3 (sliding window 6) + a base-model tokenizer (no chat template) that adds ``<s>``."""
    from bos_assets import build_bos_tokenizer
    from conftest import build_tiny_gemma3

    out = tmp_path_factory.mktemp("bos-gemma3")
    tok = build_bos_tokenizer(chat_template=None)
    model = build_tiny_gemma3(len(tok), sliding_window=WINDOW)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_truthfulqa_equals_hflm_on_a_bos_adding_sliding_window_model(bos_gemma_dir, small_bench, tmp_path):
    from transformers import AutoTokenizer

    from selfalign.cli import main
    from selfalign.evaluation.lmeval import load_task_configs
    from selfalign.generation.encoding import hflm_encode

    tok = AutoTokenizer.from_pretrained(bos_gemma_dir)
    # Gemma 3's tokenizer in miniature: the attribute says no BOS, encoding adds one
    assert getattr(tok, "add_bos_token", False) is False and tok("")["input_ids"] == [tok.bos_token_id]
    cfg = load_task_configs(TASKS_DIR, small_bench, ("selfalign_truthfulqa_mc1",))[0]
    primer = cfg["doc_to_text"].split("'")[1]  # the 6-shot primer alone is already far longer than the window
    assert len(hflm_encode(tok, primer)) > 20 * WINDOW

    out = tmp_path / "eval_gemma.json"
    rc = main(["bench", "eval", "--params", str(ROOT / "params.yaml"), "--model", str(bos_gemma_dir),
               "--benchmarks", str(small_bench), "--tasks", str(TASKS_DIR), "--limit", "4", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())

    assert result["model"] == str(bos_gemma_dir) and result["architecture"] == "Gemma3ForCausalLM"
    assert result["model_name"].startswith(str(bos_gemma_dir))  # no provenance.json: path + config hash
    assert result["bos_id"] == tok.bos_token_id and result["hflm_add_bos_token"] is True
    tq = result["truthfulqa_vs_hflm"]
    for kind in ("mc1", "mc2"):
        assert tq[kind]["n_docs"] == 4  # the same items on both sides
        assert tq[kind]["abs_diff_points"] <= 0.5, tq
    assert tq["tolerance_points"] == 0.5 and tq["pass"] is True
    # the real property behind the 0.5 points: every per-choice log-likelihood equal (BOS, window, packing)
    assert result["max_abs_loglik_diff"] < 1e-4
    # through the shared-prefix kernel (sliding-window staircase), not the fallback to the model's attention
    assert result["backend_shared_prefix"] is True
    assert result["builtin_truthfulqa"]["max_abs_diff"] == 0.0


def test_hflm_without_the_bos_is_refused_before_scoring(bos_gemma_dir, config):
    """The guard the comparison rests on: an HFLM that would score without the BOS our scorer adds fails."""
    from lm_eval.models.huggingface import HFLM

    from selfalign.bench.eval import check_same_encoding, make_hflm
    from selfalign.generation import make_engine

    engine = make_engine(config.generation, bos_gemma_dir)
    assert make_hflm(str(bos_gemma_dir), engine, batch_size=2, dtype="float32").add_bos_token is True
    wrong = HFLM(pretrained=str(bos_gemma_dir), device="cpu", batch_size=2, dtype="float32", add_bos_token=False)
    with pytest.raises(RuntimeError, match="different sequences"):
        check_same_encoding(wrong, engine.tok)


def test_hflm_gets_no_bos_for_a_tokenizer_that_adds_none(tiny_model_dir, config):
    """SmolLM2's case: a declared bos_token that encoding never adds; HFLM is told not to add it either."""
    from selfalign.bench.eval import make_hflm
    from selfalign.generation import make_engine

    engine = make_engine(config.generation, tiny_model_dir)
    hflm = make_hflm(str(tiny_model_dir), engine, batch_size=2, dtype="float32")
    assert hflm.add_bos_token is False
    assert hflm.tok_encode("Q: hi") == engine.tok("Q: hi", add_special_tokens=False)["input_ids"]
