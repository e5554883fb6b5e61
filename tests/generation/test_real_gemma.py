"""The HF engine on the REAL Gemma 3 270M base (``gemma_base_dir``): a shared prefix longer than its
512-token sliding window goes through the shared-prefix kernel, and greedy decoding gives the very token ids
``model.generate`` gives on the full prompt (BOS once) -- what the tiny window-6 Gemma checks, on real weights."""

from __future__ import annotations

import pytest
import torch

from selfalign.config import project_config
from selfalign.generation.base import Request, SamplingParams

QUERIES = ["Why is the sky blue?", "Write a haiku about autumn.", "What is 17 times 23?"]
NEW_TOKENS = 16


@pytest.mark.slow
def test_engine_over_the_sliding_window_equals_model_generate(gemma_base_dir):
    from selfalign.bench.generation import build_prefix
    from selfalign.generation.attention import kernel_installed
    from selfalign.generation.hf import HFEngine
    from selfalign.models import load_model, load_tokenizer

    config = project_config()
    tok = load_tokenizer(gemma_base_dir)
    engine = HFEngine(load_model(gemma_base_dir), tok, config.generation.model_copy(update={"batch_size": 3}),
                      model_id=str(gemma_base_dir))
    assert engine.shares_prefix and kernel_installed(engine.model)  # not the fallback (model's own attention)
    window = engine.model.config.sliding_window
    prefix, suffix = build_prefix(config, tok, 700)  # the real self-align preamble, exemplars repeated
    requests = [Request(f"q{i}", prefix, suffix(q)) for i, q in enumerate(QUERIES)]
    got = dict(engine.generate_token_ids(requests, SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)))

    bos = tok.bos_token_id
    prefix_ids = engine.prompt_ids(prefix, "")[0]
    assert window == 512 and len(prefix_ids) > window + 100
    assert [k for k in engine._prefix_caches] == [tuple(prefix_ids[:-1])]  # one prefix, computed once
    reference = load_model(gemma_base_dir)  # loaded apart: the engine switched its model's attention
    assert not kernel_installed(reference)
    for req in requests:
        ids = sum(engine.prompt_ids(req.prefix, req.text), [])
        assert ids[0] == bos and ids.count(bos) == 1
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=engine.pad_id)
        want = out[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(want) if t in engine.eos_ids), len(want))
        assert got[req.id] == want[:cut] and cut > 0, req.id  # the engine's ids stop before an eos
