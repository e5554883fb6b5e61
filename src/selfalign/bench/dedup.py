"""ROUGE-L near-duplicate filter at scale: time for N candidates and agreement with brute force.

Candidates are synthetic but shaped like self-instruct output: seed instructions with word
substitutions (near copies), splices of two seeds (partial overlap) and fresh instructions from the
seed vocabulary (novel), so the threshold is exercised from both sides. The indexed run is checked
against brute-force rouge_score twice: on the whole stream prefix of ``--check-prefix`` candidates
(every decision), and at ``--spot-checks`` random later positions against the exact kept set the
index had there (the brute-force max over hundreds of thousands of pairs each).
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path
from typing import Any

from selfalign.config import Config
from selfalign.dedup import RougeLIndex, brute_force_keep
from selfalign.io import write_json
from selfalign.prompts.annotation import load_seed_tasks

log = logging.getLogger(__name__)


def synthetic_instructions(seeds: list[str], n: int, seed: int) -> list[str]:
    """``n`` instruction-like strings derived from the seed instructions (deterministic)."""
    rng = random.Random(seed)
    vocab = [w for s in seeds for w in s.split()]
    verbs = [s.split()[0] for s in seeds]
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.35:  # near copy: a few word substitutions / deletions
            words = rng.choice(seeds).split()
            for _ in range(rng.randint(1, 6)):
                i = rng.randrange(len(words))
                if rng.random() < 0.7:
                    words[i] = rng.choice(vocab)
                elif len(words) > 4:
                    del words[i]
        elif kind < 0.7:  # splice: the opening of one seed, the ending of another
            a, b = rng.choice(seeds).split(), rng.choice(seeds).split()
            words = a[: rng.randint(2, max(2, len(a) - 1))] + b[rng.randint(1, max(1, len(b) - 2)):]
        else:  # fresh: a seed verb and random seed words
            words = [rng.choice(verbs)] + [rng.choice(vocab) for _ in range(rng.randint(5, 20))]
        out.append(" ".join(words))
    return out


def _index_decisions(seeds: list[str], cands: list[str],
                     threshold: float) -> tuple[list[bool], list[int], RougeLIndex, float]:
    """The index's keep decision per candidate, the kept-set size before each, the index, and the time taken."""
    from tqdm import tqdm

    start = time.perf_counter()
    index = RougeLIndex(threshold, RougeLIndex.document_frequencies(seeds + cands))
    for i, s in enumerate(seeds):
        index.add(f"seed-{i}", s)
    decisions, kept_before = [], []
    for i, c in enumerate(tqdm(cands, desc="dedup", unit="cand", mininterval=2.0)):
        kept_before.append(len(index))
        decisions.append(index.add_if_novel(f"c{i}", c) is None)
    return decisions, kept_before, index, time.perf_counter() - start


def _agreement(seeds: list[str], cands: list[str], decisions: list[bool], kept_before: list[int], threshold: float,
               check_prefix: int, spot_checks: int, seed: int) -> tuple[dict[str, Any], float]:
    """Brute-force rouge_score re-decides the whole prefix, then ``spot_checks`` later random candidates
    against the exact kept set the index had at their position. Also returns the prefix's brute-force time."""
    from rouge_score import rouge_scorer
    from tqdm import tqdm

    n = len(cands)
    kept_texts = seeds + [c for c, keep in zip(cands, decisions) if keep]
    start = time.perf_counter()
    prefix = min(check_prefix, n)
    brute = brute_force_keep(cands[:prefix], seeds, threshold)
    prefix_agree = sum(a == b for a, b in zip(brute, decisions[:prefix]))
    brute_prefix_s = time.perf_counter() - start

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(seed)
    spots = sorted(rng.sample(range(prefix, n), min(spot_checks, max(0, n - prefix))))
    spot_agree = 0
    for pos in tqdm(spots, desc="brute-force spot checks", unit="cand"):
        history = kept_texts[: kept_before[pos]]
        dup = any(scorer.score(h, cands[pos])["rougeL"].fmeasure > threshold for h in history)
        spot_agree += (not dup) == decisions[pos]
    return {
        "prefix_candidates": prefix,
        "prefix_agree": prefix_agree,
        "prefix_brute_force_s": round(brute_prefix_s, 2),
        "spot_checks": len(spots),
        "spot_agree": spot_agree,
        "all_agree": prefix_agree == prefix and spot_agree == len(spots),
    }, brute_prefix_s


def run(config: Config, out: str | Path, n: int, check_prefix: int, spot_checks: int) -> dict[str, Any]:
    cfg = config.red_team
    threshold = cfg.rouge_threshold
    seeds = [s.instruction for s in load_seed_tasks(cfg.seed_tasks_file)]
    cands = synthetic_instructions(seeds, n, cfg.seed)
    decisions, kept_before, index, elapsed = _index_decisions(seeds, cands, threshold)
    agreement, brute_prefix_s = _agreement(seeds, cands, decisions, kept_before, threshold, check_prefix,
                                           spot_checks, cfg.seed + 1)
    prefix = agreement["prefix_candidates"]
    result = {
        "candidates": n,
        "threshold": threshold,
        "seeds": len(seeds),
        "kept": sum(decisions),
        "rejected_near_duplicate": n - sum(decisions),
        "time_s": round(elapsed, 2),
        "candidates_per_s": round(n / elapsed, 1),
        "exact_comparisons": index.exact_comparisons,
        "brute_force_pairs_equivalent": sum(kept_before),
        # brute force's pair rate measured on the prefix, extrapolated to the whole stream
        "brute_force_est_s": round(sum(kept_before) * brute_prefix_s / max(1, sum(kept_before[:prefix])), 1),
        "agreement": agreement,
        "note": "single process, 2-core machine shared with other jobs (timings under load)",
    }
    write_json(out, result)
    log.info("dedup bench: %d candidates in %.1fs (%.0f/s; brute force ~%.0fs), kept %d, agreement %s",
             n, elapsed, n / elapsed, result["brute_force_est_s"], result["kept"], result["agreement"])
    return result


def positive_int(text: str) -> int:
    """argparse type for a count that must be at least 1: ``--n 0`` would divide the rates by an empty stream."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench/results/dedup.json", help="result JSON path")
    parser.add_argument("--n", type=positive_int, default=50_000, help="candidate instructions")
    parser.add_argument("--check-prefix", type=int, default=1000,
                        help="first candidates re-decided entirely by brute force")
    parser.add_argument("--spot-checks", type=int, default=20,
                        help="later random candidates re-decided by brute force against the index's kept set")


def main(args: argparse.Namespace, config: Config) -> None:
    run(config, args.out, args.n, args.check_prefix, args.spot_checks)
