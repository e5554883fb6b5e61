"""ROUGE-L near-duplicate index: exact agreement with brute-force rouge_score, and sound bounds."""

from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer

from selfalign.dedup import RougeLIndex, brute_force_keep, lcs_length, rouge_l_f, rouge_tokens

WORDS = ("write a short poem about the sea explain why sky is blue list five ideas for party "
         "summarise text in one sentence give me tips to sleep better code python function").split()


def _random_texts(n: int, seed: int, vocab: list[str], max_len: int = 14) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


def _perturbed(base: list[str], n: int, seed: int) -> list[str]:
    """Near copies of base texts (word swaps/drops/inserts): many pairs sit near any threshold."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choice(base).split()
        for _ in range(rng.randint(0, 4)):
            op = rng.random()
            if op < 0.4 and words:
                words[rng.randrange(len(words))] = rng.choice(WORDS)
            elif op < 0.7 and words:
                del words[rng.randrange(len(words))]
            else:
                words.insert(rng.randint(0, len(words)), rng.choice(WORDS))
        out.append(" ".join(words))
    return out


def _index_keep(cands: list[str], refs: list[str], threshold: float, freq=None) -> list[bool]:
    index = RougeLIndex(threshold, freq)
    for i, r in enumerate(refs):
        index.add(f"r{i}", r)
    return [index.add_if_novel(f"c{i}", c) is None for i, c in enumerate(cands)]


def test_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 20))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 20))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = (table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1]
                               else max(table[i - 1][j], table[i][j - 1]))
        assert lcs_length(a, b) == table[-1][-1]


def test_rouge_l_f_is_rouge_score_bit_for_bit():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = _random_texts(120, 1, WORDS[:8]) + ["Héllo, World!", "", "1. Instruction: do it"]
    for a in texts:
        for b in texts[:40]:
            assert rouge_l_f(a, b) == scorer.score(b, a)["rougeL"].fmeasure


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_index_decisions_equal_brute_force(threshold):
    refs = _random_texts(30, 2, WORDS, max_len=10)
    cands = _perturbed(refs, 250, 3) + _random_texts(50, 4, WORDS)
    expected = brute_force_keep(cands, refs, threshold)
    assert _index_keep(cands, refs, threshold) == expected
    # a different (even adversarial) global token order changes speed, never decisions
    reverse = {w: -i for i, w in enumerate(sorted(set(WORDS)))}
    assert _index_keep(cands, refs, threshold, reverse) == expected
    if 0.0 < threshold < 1.0:
        assert 0 < sum(expected) < len(expected), "test data must exercise both decisions"


def test_index_prunes_pairs_that_cannot_match():
    refs = _random_texts(200, 5, WORDS, max_len=12)
    cands = _perturbed(refs, 200, 6)
    index = RougeLIndex(0.7, RougeLIndex.document_frequencies(refs + cands))
    for i, r in enumerate(refs):
        index.add(f"r{i}", r)
    for i, c in enumerate(cands):
        index.add_if_novel(f"c{i}", c)
    # brute force would score every candidate against every indexed text
    assert index.exact_comparisons < 0.25 * len(cands) * (len(refs) + len(cands) / 2)


def test_find_duplicate_reports_key_and_score():
    index = RougeLIndex(0.7)
    index.add("seed-1", "Write a short poem about the sea.")
    key, f = index.find_duplicate("write a short poem about the sea")
    assert key == "seed-1" and f == pytest.approx(1.0)
    assert index.find_duplicate("Explain how vaccines train the immune system.") is None
    assert index.find_duplicate("!!!") is None and rouge_tokens("!!!") == []


def test_threshold_out_of_range_is_an_error():
    with pytest.raises(ValueError):
        RougeLIndex(1.5)
