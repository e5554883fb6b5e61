"""Generation benchmark: the workload reaches its prefix length; its steps on the tiny model."""

from __future__ import annotations

import pytest

from selfalign.bench.generation import build_prefix


def test_prefix_reaches_target_and_suffix_is_the_open_turn(config, tiny_tokenizer):
    base, _ = build_prefix(config, tiny_tokenizer, 1)
    n_base = len(tiny_tokenizer(base, add_special_tokens=False)["input_ids"])
    prefix, suffix = build_prefix(config, tiny_tokenizer, n_base + 500)
    assert len(tiny_tokenizer(prefix, add_special_tokens=False)["input_ids"]) >= n_base + 500
    assert prefix.endswith(base[base.rindex("\n\nUser:"):])  # still ends with the open user turn
    assert "Why is the sky blue?" in suffix("Why is the sky blue?")


def _tiny_workload(config, tiny_model_dir, queries: int = 3, new_tokens: int = 6, tok_model=None,
                   batch_size: int = 2):
    """The benchmark's workload on the tiny model, with a short prefix (the real preamble exceeds its context)."""
    from selfalign.bench.generation import QUERIES, Workload, prompt_token_ids
    from selfalign.generation.base import Request, SamplingParams
    from selfalign.generation.hf import HFEngine
    from selfalign.models import load_model, load_tokenizer

    tok, model = tok_model or (load_tokenizer(tiny_model_dir), load_model(tiny_model_dir))
    gen = config.generation.model_copy(update={"batch_size": batch_size})
    prefix = "Rules: be helpful, be honest.\n\nUser: What is the capital of France?\n\nAssistant: Paris.\n\n"
    requests = [Request(f"q{i:02d}", prefix, f"User: {q}\n\nAssistant:") for i, q in enumerate(QUERIES[:queries])]
    probe = HFEngine(model, tok, gen.model_copy(update={"batch_size": 1}))
    return Workload(model=model, tok=tok, gen=gen, model_dir=str(tiny_model_dir), requests=requests,
                    sampling=SamplingParams(max_new_tokens=new_tokens), prefix=prefix,
                    prompts=prompt_token_ids(probe, requests), plen=len(probe.prompt_ids(prefix, "")[0]),
                    eos=probe.eos_ids, pad=probe.pad_id)


def test_bench_steps_on_the_tiny_model(config, tiny_model_dir):
    """Engine at batch size 1 is token-identical to naive ``model.generate``; the record adds up."""
    from selfalign.bench.generation import bs1_token_ids, summarise, time_baselines, time_engine

    w = _tiny_workload(config, tiny_model_dir)
    eng = time_engine(w)
    bs1 = bs1_token_ids(w, w.requests)
    naive, batched = time_baselines(w, 2)
    assert [bs1[r.id] for r in w.requests[:2]] == naive.outputs
    assert len(batched.outputs) == 2 and naive.tokens == sum(map(len, naive.outputs))
    assert {rid: w.tok.decode(ids) for rid, ids in bs1.items()} == {rid: r.text for rid, r in eng.results.items()}
    assert 0 < eng.prefix_seconds < eng.seconds and eng.flops > 0 and eng.matmul_flop_s > 0
    rec = summarise(w, eng, bs1, w.requests[:2], naive, batched, nq=2)
    assert rec["greedy_identical_bs1"] and rec["identical_bs1_count"] == rec["bs1_queries"] == 2
    assert rec["generated_tokens"] == {"naive": naive.tokens, "batched": batched.tokens, "engine": eng.tokens}
    assert rec["agreement_batched"] == 1.0 and rec["agreement_queries"] == 2  # compared where naive ran
    assert rec["roofline_fraction"] == pytest.approx(eng.flops / eng.seconds / eng.matmul_flop_s)


def test_bench_extrapolates_naive_only_never_the_engine(config, tiny_model_dir):
    """The engine is measured at the query count the record reports; only naive generate (one query at a time)
    is scaled from its measured queries to that count. The bug this guards: 8 queries in one batch reported as
    32 queries' tokens over the 8-query time (an 18x "speedup")."""
    from selfalign.bench.generation import bs1_token_ids, summarise, time_baselines, time_engine

    w = _tiny_workload(config, tiny_model_dir, queries=3, batch_size=4)  # one batch, as in generation_gemma.json
    eng = time_engine(w)
    bs1 = bs1_token_ids(w, w.requests[:1])
    naive, batched = time_baselines(w, 1)
    rec = summarise(w, eng, bs1, w.requests[:1], naive, batched, nq=1)
    assert rec["queries"] == 3 and rec["naive_queries"] == 1
    assert rec["engine_s"] == eng.seconds and rec["engine_tok_s"] == eng.tokens / eng.seconds
    ext = rec["extrapolated"]
    assert ext["queries"] == rec["queries"] and ext["naive_queries_measured"] == 1
    assert ext["naive_s"] == pytest.approx(naive.seconds * 3)
    assert ext["speedup_vs_naive"] == pytest.approx(naive.seconds * 3 / eng.seconds)
    assert not [k for k in ext if k.startswith(("engine", "batched"))]  # nothing of the engine is scaled
    assert "extrapolated" in rec["measured"]  # the record says which numbers are measured
    # naive on every query: nothing extrapolated
    naive, batched = time_baselines(w, 3)
    assert summarise(w, eng, bs1, w.requests[:1], naive, batched, nq=3)["extrapolated"] is None


def test_bench_reference_prompts_carry_the_bos_the_engine_adds(config, tmp_path):
    """On a BOS tokenizer (Gemma-like) the baselines' prompts hold the BOS exactly once, as the engine's do,
    so naive ``model.generate`` and the engine agree token for token; without a BOS nothing changes."""
    from bos_assets import build_bos_model, build_bos_tokenizer
    from transformers import AutoTokenizer

    from selfalign.bench.generation import bs1_token_ids, time_baselines

    build_bos_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    w = _tiny_workload(config, tmp_path, tok_model=(tok, build_bos_model(tok)))
    bos = tok.bos_token_id
    assert all(p[0] == bos and p.count(bos) == 1 for p in w.prompts)
    assert w.plen == len(tok(w.prefix)["input_ids"])  # the prefix's ids with its BOS
    bs1 = bs1_token_ids(w, w.requests)
    naive, _ = time_baselines(w, 2)
    assert [bs1[r.id] for r in w.requests[:2]] == naive.outputs


def test_bench_prompts_without_a_bos_are_the_plain_encodings(config, tiny_model_dir):
    """SmolLM2's case (no BOS): the reference prompts stay ``encode(prefix) + encode(text)``."""
    w = _tiny_workload(config, tiny_model_dir)
    enc = lambda s: w.tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert w.prompts == [enc(r.prefix) + enc(r.text) for r in w.requests] and w.plen == len(enc(w.prefix))


def test_choose_rows_time_both_rules_and_agree(config, tiny_model_dir):
    """The token-choice rows: every setting on synthetic and on a real model's logits, same tokens both ways."""
    from selfalign.bench.generation import choose_rows, sampling_settings

    rec = choose_rows(config, [str(tiny_model_dir)], rows=6, vocab=3000)
    names = [r["name"] for r in rec["rows"]]
    assert names == [f"{src}/{s}" for src in ("synthetic", str(tiny_model_dir)) for s in sampling_settings(config)]
    assert all(r["identical"] and r["rows"] == 6 and r["speedup"] > 0 for r in rec["rows"])
    assert [r["vocab"] for r in rec["rows"]] == [3000] * 3 + [rec["rows"][3]["vocab"]] * 3
    assert "load average" in rec["uptime_before"]
