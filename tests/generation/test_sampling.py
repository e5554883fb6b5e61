"""Token choice: the top-k prefiltered nucleus and the sparse bias/penalties pick exactly what the full sort did.

The oracle, :func:`old_choose`, is ``HFEngine._choose`` as it stood before sampling.py (dense bias vector,
per-row penalties, full sort of every row): same generator seeds must give the same tokens and leave the
generators in the same state (later steps draw from the same stream).
"""

from __future__ import annotations

import pytest
import torch

from selfalign.generation.sampling import (LogitBias, _prefiltered, apply_bias_and_penalties, choose,
                                           nucleus_sample)


def old_choose(logits, temperature, top_p, bias_vec, penalties, generators):
    """The pre-sampling.py rule, verbatim apart from taking its inputs as arguments."""
    logits = logits.float()
    if bias_vec is not None:
        logits = logits + bias_vec[: logits.shape[-1]]
    for j, pen in enumerate(penalties):
        if pen:
            idx = torch.tensor(list(pen), device=logits.device)
            logits[j, idx] -= torch.tensor(list(pen.values()), device=logits.device)
    if temperature == 0:
        return logits.argmax(-1).tolist()
    return old_nucleus(torch.softmax(logits / temperature, dim=-1), top_p, generators)


def old_nucleus(probs, top_p, generators):
    sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
    if top_p < 1.0:
        drop = (sorted_p.cumsum(-1) - sorted_p) > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = []
    for j, g in enumerate(generators):
        k = torch.multinomial(sorted_p[j].cpu(), 1, generator=g).item()
        out.append(int(sorted_i[j, k]))
    return out


def _logits(rows: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    """Gaussian logits: ``scale`` sets how peaked (large: nucleus of a few tokens; small: thousands)."""
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _same_stream(a: list[torch.Generator], b: list[torch.Generator]) -> bool:
    return all(torch.equal(x.get_state(), y.get_state()) for x, y in zip(a, b))


def _check_steps(logits: torch.Tensor, temperature: float, top_p: float, seeds, steps: int = 3,
                 bias: dict[int, float] | None = None, penalties=None) -> None:
    """Several decode steps with the same generators: equal tokens every step, equal generator states after."""
    penalties = penalties or [None] * logits.shape[0]
    dense = None
    if bias:
        dense = torch.zeros(logits.shape[-1])
        for i, b in bias.items():
            dense[i] = b
    g_old, g_new = _gens(seeds), _gens(seeds)
    for step in range(steps):
        x = logits.roll(step * 7, dims=-1)
        want = old_choose(x.clone(), temperature, top_p, dense, penalties, g_old)
        got = choose(x, temperature, top_p, LogitBias.from_dict(bias or {}), penalties, g_new)
        assert got == want, (step, top_p, temperature)
    assert _same_stream(g_old, g_new)


@pytest.mark.parametrize("vocab", [300, 50_000])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.7, 0.9, 0.95, 0.98, 0.9999, 1.0])
def test_equal_to_full_sort_across_seeds_and_shapes(vocab, top_p):
    for scale, temperature in ((8.0, 0.5), (3.0, 1.0), (1.0, 1.0), (0.3, 0.7)):
        logits = _logits(3, vocab, scale, seed=vocab + int(scale * 10))
        _check_steps(logits, temperature, top_p, seeds=range(100, 103))
    for seed in range(40):  # one row, many seeds: most rows take the prefilter
        _check_steps(_logits(1, vocab, 4.0, seed), 1.0, top_p, seeds=[seed], steps=1)


@pytest.mark.parametrize("top_p", [0.5, 0.95, 0.98, 1.0])
def test_equal_to_full_sort_at_gemma_vocab(top_p):
    """262144 entries (Gemma 3): peaked rows (prefilter), flat rows (full-sort fallback), both in one batch."""
    logits = torch.cat([_logits(2, 262_144, 6.0, 1), _logits(1, 262_144, 0.2, 2)])
    _check_steps(logits, 1.0, top_p, seeds=[5, 6, 7], steps=2)
    for seed in range(8):
        _check_steps(_logits(1, 262_144, 3.0, seed), 0.7, top_p, seeds=[seed], steps=1)


def test_each_path_is_taken_and_equal():
    """A peaked row resolves at k=256, a middling one only at 4096, a flat one at neither (full sort)."""
    vocab, top_p = 50_000, 0.95
    peaked, middle, flat = _logits(1, vocab, 6.0, 1), _logits(1, vocab, 4.0, 2), _logits(1, vocab, 0.1, 3)
    probs = torch.softmax(torch.cat([peaked, middle, flat]), dim=-1)
    assert set(_prefiltered(probs, top_p, [0, 1, 2], 256)) == {0}
    assert set(_prefiltered(probs, top_p, [1, 2], 4096)) == {1}
    seeds = range(20)
    for s in seeds:
        g_old, g_new = _gens([s, s + 1, s + 2]), _gens([s, s + 1, s + 2])
        assert nucleus_sample(probs, top_p, g_new) == old_nucleus(probs, top_p, g_old)
        assert _same_stream(g_old, g_new)


def test_ties_inside_the_nucleus():
    """Logits on a coarse grid: many tokens share a probability inside the nucleus and at its edge, where
    topk and sort may order them differently; the drawn position's token must still be the sort's."""
    vocab = 5000
    for seed in range(30):
        logits = (_logits(2, vocab, 3.0, seed) * 2).round() / 2  # steps of 0.5: ties everywhere
        logits[:, :40] = logits.max() + 1.0  # 40 tokens tied at the top
        probs = torch.softmax(logits, -1)
        assert (probs[0] == probs[0].max()).sum() == 40
        for top_p in (0.3, 0.9, 0.97):
            _check_steps(logits, 1.0, top_p, seeds=[seed, seed + 1000], steps=2)


def test_rows_sharing_one_generator_draw_in_row_order():
    logits = torch.cat([_logits(1, 3000, 4.0, 1), _logits(1, 3000, 0.05, 2), _logits(1, 3000, 4.0, 3)])
    g_old, g_new = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(3):
        assert choose(logits, 1.0, 0.9, None, [None] * 3, [g_new] * 3) == \
            old_choose(logits, 1.0, 0.9, None, [None] * 3, [g_old] * 3)
    assert _same_stream([g_old], [g_new])


def test_greedy_with_bias_and_penalties():
    logits = _logits(4, 1000, 2.0, 0)
    bias = {3: -100.0, 17: 5.5, 999: 0.25}
    penalties = [{17: 2.0, 4: 1.5}, None, {}, {3: 0.5, 500: 100.0}]
    _check_steps(logits, 0.0, 1.0, seeds=range(4), bias=bias, penalties=penalties, steps=1)
    _check_steps(logits, 0.8, 0.9, seeds=range(4), bias=bias, penalties=penalties)


def test_sparse_bias_and_penalties_are_bitwise_the_dense_ones():
    logits = _logits(3, 777, 3.0, 4)
    logits[0, 5] = -0.0
    bias = {5: 1.1, 6: -100.0, 800: 9.0}  # 800 lies past the logits (a bias vector longer than the head)
    penalties = [{6: 0.3, 7: 1e-3}, None, {5: 2.2}]
    dense = torch.zeros(1000)
    for i, b in bias.items():
        dense[i] = b
    want = logits + dense[:777]
    for j, pen in enumerate(penalties):
        if pen:
            want[j, torch.tensor(list(pen))] -= torch.tensor(list(pen.values()))
    before = logits.clone()
    got = apply_bias_and_penalties(logits, LogitBias.from_dict(bias), penalties)
    assert torch.equal(got, want)
    assert torch.equal(logits, before)  # the model's logits are left alone
    assert apply_bias_and_penalties(logits, None, [None] * 3) is logits  # nothing to add: no copy
    assert LogitBias.from_dict({}) is None


def test_bfloat16_logits():
    """Half-precision heads tie far more often; the rule applies to their float32 upcast."""
    logits = _logits(3, 4000, 3.0, 7).to(torch.bfloat16)
    _check_steps(logits, 1.0, 0.95, seeds=[1, 2, 3])


def test_engine_tokens_equal_the_old_choose(tiny_model_dir, monkeypatch):
    """The whole decode loop (bias, per-order n-gram penalties, seeded rows leaving the batch) with the
    old rule swapped back in gives the same token ids."""
    from selfalign.config import project_section
    from selfalign.generation import make_engine
    from selfalign.generation.base import Request, SamplingParams
    from selfalign.generation.hf import HFEngine

    eng = make_engine(project_section("generation", batch_size=3), tiny_model_dir)
    words = sorted(w for w in eng.tok.get_vocab() if w.isalpha() and len(w) > 2)[:2]
    requests = [Request(f"r{i}", "User: hello there.\n\nAssistant: hi.\n\n", t)
                for i, t in enumerate(["User: Is the sky blue?", "The quick brown fox", "Numbers 0 1 2", "def f(x):"])]
    runs = [SamplingParams(temperature=t, top_p=p, max_new_tokens=20, seed=s, ngram_penalties=n,
                           logit_bias={words[0]: -100.0, words[1]: 3.0} if s % 2 else {})
            for t, p, s, n in ((1.0, 0.9, 1, (0.5, 0.0, 1.0)), (0.7, 0.98, 2, ()), (0.0, 1.0, 3, (1.0,)),
                               (1.0, 1.0, 5, ()), (0.5, 0.3, 7, (0.0, 2.0)))]
    new = [dict(eng.generate_token_ids(requests, s)) for s in runs]

    def choose_old(self, logits, rows, sampling, bias):
        dense = None
        if bias is not None:
            dense = torch.zeros(self.model.config.vocab_size)
            dense[bias.ids] = bias.values
        return old_choose(logits, sampling.temperature, sampling.top_p, dense,
                          [r.ngram.penalties() if r.ngram else None for r in rows], [r.generator for r in rows])

    monkeypatch.setattr(HFEngine, "_choose", choose_old)
    old = [dict(eng.generate_token_ids(requests, s)) for s in runs]
    assert new == old
    assert any(len(set(map(tuple, run.values()))) > 1 for run in new)  # rows really differ
