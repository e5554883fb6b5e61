"""Can step 2 keep a refusal with this teacher? The step-2 preamble on clearly harmful requests.

Step 2 keeps a refusal only when the answer refuses, the thought cites the refusal principle and names a harm,
and the prompt is of a harmful type (``self_align.refusal_principle``, ``harm_judgement``, ``harmful_types``).
When ``metrics/self_align.json`` reports ``refusals.kept_harmful`` = 0, two different things may be the cause:
step 1 wrote no harmful prompt, or the teacher does not refuse one. This benchmark separates them: it asks the
teacher (``models/base`` under exactly step 2's preamble, sampling and filters) each request of
``bench/inputs/harmful_requests.yaml`` ``--samples`` times, every request treated as of a harmful type, and
counts thoughts that cite the principle, thoughts that judge harm, answers that refuse, refusals kept, and the
reject reasons. Our finding on the embedded SmolLM2-135M is in the README.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from selfalign.bench.dedup import positive_int
from selfalign.config import Config

log = logging.getLogger(__name__)


def load_requests(path: str | Path) -> list[str]:
    """The request list (a YAML list of strings); a one-line :class:`DataError` naming the file otherwise."""
    from selfalign.io import DataError, parse_yaml

    if not Path(path).is_file():
        raise DataError(f"{path}: request file not found")
    data = parse_yaml(Path(path).read_text(encoding="utf-8"), path)
    if not isinstance(data, list) or not data or not all(isinstance(r, str) and r.strip() for r in data):
        raise DataError(f"{path}: expected a non-empty YAML list of request strings")
    return [r.strip() for r in data]


def run(config: Config, requests: Sequence[str], samples: int, engine: Any) -> dict[str, Any]:
    """Generate ``samples`` step-2 completions per request with ``engine`` and judge each as step 2 does."""
    from selfalign import filters
    from selfalign.generation.base import Request
    from selfalign.prompts.self_align import query_text
    from selfalign.stages import self_align as sa

    cfg = config.self_align
    pre = sa.build_preamble(cfg)
    reqs = [Request(f"r{i:03d}-s{k}", pre.text, query_text(pre.template, q))
            for i, q in enumerate(requests) for k in range(samples)]
    start = time.perf_counter()
    counts: Counter = Counter()
    reasons: Counter = Counter()
    records = []
    for res in engine.generate(reqs, sa.sampling_params(cfg, pre.template)):
        query = requests[int(res.id[1:4])]
        p = sa.process(res.text, res.finish, cfg, pre, query, harmful=True)
        refused = sa.refused(cfg, p)
        judged = filters.shows_behaviour(cfg.harm_judgement, p.thought.replace(pre.template.self_id, ""))
        counts.update({"completions": 1, "cites_refusal_principle": cfg.refusal_principle in p.cited,
                       "judges_harm": judged, "refuses": refused, "kept_refusal": refused and p.reason is None})
        reasons[p.reason or "kept"] += 1
        records.append({"id": res.id, "request": query, "cited": p.cited, "judges_harm": judged,
                        "refuses": refused, "reason": p.reason, "answer": p.answer.text})
    return {
        "requests": len(requests),
        "samples_per_request": samples,
        **{k: counts.get(k, 0) for k in ("completions", "cites_refusal_principle", "judges_harm", "refuses",
                                         "kept_refusal")},
        "reasons": dict(reasons.most_common()),
        "wall_s": round(time.perf_counter() - start, 2),
        "records": sorted(records, key=lambda r: r["id"]),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench/results/teacher_refusal.json", help="result JSON")
    parser.add_argument("--model", default="models/base", help="teacher model directory (step 2's)")
    parser.add_argument("--requests", default="bench/inputs/harmful_requests.yaml", help="harmful requests (YAML list)")
    parser.add_argument("--samples", type=positive_int, default=3, help="completions per request (step 2's sampling)")


def main(args: argparse.Namespace, config: Config) -> None:
    from selfalign.generation import make_engine
    from selfalign.io import write_json

    result = run(config, load_requests(args.requests), args.samples, make_engine(config.generation, args.model))
    write_json(Path(args.out), result)
    log.info("teacher_refusal: %d completions, %d refuse, %d kept; reasons %s", result["completions"],
             result["refuses"], result["kept_refusal"], result["reasons"])
