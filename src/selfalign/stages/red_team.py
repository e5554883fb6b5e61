"""Step 1: synthetic prompts by vanilla self-instruct and topic-guided red-teaming (data/prompts/).

Two sources, both written by the *base* model from raw completion prompts (no chat template):

* **self-instruct**: a few-shot list of k sampled seed tasks; the model continues the numbered list;
  instructions are parsed, filtered (length window, media blacklist, clean start) and ROUGE-L
  de-duplicated against the seeds and everything kept (:func:`selfalign.selection.filter_novel`).
* **topic-guided red-teaming**: for each of 20 adversarial question types, a topic pool grows for
  ``topic_rounds`` brainstorming rounds from the one human seed topic (parse, case-insensitive dedup,
  balance the pool across types); then one question is written per (type, topic) pair from prompts
  whose hints mix seed examples with new pairs; the first question per pair is kept. With
  ``question_per_pair`` each new pair gets its own short request over the shared prompt (see
  :func:`selfalign.prompts.red_team.render_question_prompts`); otherwise one continuation answers all
  of a prompt's pairs.

The merge drops exact normalised duplicates across sources and any prompt matching a benchmark
question or a principle probe (contamination guard, :func:`selfalign.selection.merge_prompts`).

This module only orchestrates: the annotation loaders and prompt renderers live in
:mod:`selfalign.prompts`, the completion parsers in :mod:`selfalign.prompts.red_team_parse`, the
selection in :mod:`selfalign.selection`. Raw generations live in ``raw_dir`` under a fingerprint of
model + sampling + prompts (:class:`selfalign.generation.cache.GenerationCache`, a DVC ``persist``
output), so a killed run resumes where it stopped and a changed parameter never reuses stale completions.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from selfalign.config import Config, RedTeamConfig
from selfalign.evaluation.benchmarks import benchmark_questions
from selfalign.evaluation.probe_sets import load_probe_sets
from selfalign.filters import (apply_filters, count_reasons, instruction_length, no_blacklisted_words, starts_cleanly,
                               topic_filters)
from selfalign.generation.base import Engine, Request, SamplingParams
from selfalign.generation.cache import GenerationCache
from selfalign.io import write_json, write_jsonl
from selfalign.models import load_tokenizer, model_provenance_id
from selfalign.prompts.annotation import RedTeamType, SeedTask, load_seed_tasks, load_types, read_template
from selfalign.prompts.red_team import (render_question_prompt, render_question_prompts, render_self_instruct,
                                        render_topic_prompt)
from selfalign.prompts.red_team_parse import parse_questions, parse_self_instruct, parse_topics
from selfalign.schemas import Generator, Prompt, Reject, Topic
from selfalign.selection import PROBE_KEY, balance_topics, filter_novel, merge_prompts

log = logging.getLogger(__name__)

STAGE = "red_team"

# the modules that turn completions into stored records and prompts: the raw cache is keyed by their code
PARSING_CODE = (__name__, "selfalign.prompts.red_team_parse", "selfalign.generation.cache")


def evaluation_questions(bench_dir: str | Path, probes_dir: str | Path) -> dict[str, str]:
    """Every question the evaluation asks: benchmark questions and principle-probe prompts (``probe:<id>``).

    A generated prompt close to one of them is dropped, so no evaluation item enters training."""
    questions = benchmark_questions(bench_dir)
    questions.update({f"{PROBE_KEY}{p.id}": p.prompt for s in load_probe_sets(probes_dir) for p in s.probes})
    return questions


def _raw_fingerprint(config: Config, model_dir: Path) -> dict[str, Any]:
    """The raw cache's fingerprint: the engine's code, the parsing code (:data:`PARSING_CODE`) and the
    annotation files the requests are rendered from (already in the request texts; hashed anyway so
    the cache key names them)."""
    from selfalign.generation.runner import generation_fingerprint

    cfg = config.red_team
    files = {"seed_tasks_file": cfg.seed_tasks_file, "types_file": cfg.types_file,
             "self_instruct_template": cfg.self_instruct_template, "topic_template": cfg.topic_template,
             "question_template": cfg.question_template}
    return generation_fingerprint(config.generation, model_dir, code=list(PARSING_CODE), files=files,
                                  dtype=config.model.dtype)


def _sampling(cfg: RedTeamConfig, eos: str | None, temperature: float, top_p: float,
              max_new_tokens: int, stop: Sequence[str] = (), ngram: Sequence[float] = ()) -> SamplingParams:
    bias = {eos: -100.0} if (cfg.ban_eos and eos) else {}
    return SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                          stop=tuple(stop), logit_bias=bias, ngram_penalties=tuple(ngram), seed=cfg.seed)


# --------------------------------------------------------------------------------------- the phases
def _self_instruct(cfg: RedTeamConfig, seeds: list[SeedTask], gens: GenerationCache, sampling: SamplingParams,
                   generator: Generator, rejects: list[Reject]) -> list[Prompt]:
    rng = random.Random(f"{cfg.seed}-self_instruct")
    header = read_template(cfg.self_instruct_template)
    k = min(cfg.k_examples, len(seeds))
    requests, shown = [], {}
    for i in range(cfg.self_instruct_requests):
        examples = rng.sample(seeds, k)
        prefix, text = render_self_instruct(header, examples, cfg.no_input_marker)
        rid = f"si-{i:06d}"
        requests.append(Request(rid, prefix, text))
        shown[rid] = [s.id for s in examples]
    raw = gens.run("self_instruct", requests, sampling)

    candidates: list[Prompt] = []
    for req in requests:
        rec = raw[req.id]
        for j, item in enumerate(parse_self_instruct(rec["completion"], k + 1, rec["finish"], cfg.no_input_marker)):
            cid = f"{req.id}-{j:02d}"
            if isinstance(item, str):
                rejects.append(Reject(id=cid, stage=STAGE, reason="malformed", text=item))
                continue
            candidates.append(Prompt(id=cid, text=item[0], input=item[1], source="self_instruct",
                                     seed_ids=shown[req.id], generator=generator))
    predicates = [instruction_length(cfg.min_words, cfg.max_words), no_blacklisted_words(cfg.blacklist),
                  starts_cleanly]
    kept = filter_novel(candidates, predicates, [(s.id, s.instruction) for s in seeds], cfg.rouge_threshold,
                        rejects)
    log.info("self-instruct: %d requests -> %d candidates -> %d kept", len(requests), len(candidates), len(kept))
    return kept


def _grow_topics(cfg: RedTeamConfig, types: list[RedTeamType], gens: GenerationCache, sampling: SamplingParams,
                 generator: Generator, rejects: list[Reject]) -> tuple[list[Topic], list[int]]:
    rng = random.Random(f"{cfg.seed}-topics")
    template = read_template(cfg.topic_template)
    by_name = {t.name: t for t in types}
    topics: dict[str, list[Topic]] = {t.name: [Topic(id=f"topic-{t.name}-seed", type=t.name, topic=t.topic, round=0)]
                                     for t in types}
    predicates = {t.name: topic_filters(cfg.topic_max_words, t.name) for t in types}
    sizes = [1]
    for rnd in range(1, cfg.topic_rounds + 1):
        requests, shown_n = [], {}
        for name, pool in topics.items():
            names = [t.topic for t in pool]
            n_prompts = len(names) if cfg.topic_prompts_per_type is None else min(len(names), cfg.topic_prompts_per_type)
            for j, own in enumerate(names[:n_prompts]):
                others = [t for t in names if t != own]
                shown = [own] + rng.sample(others, min(cfg.topics_shown - 1, len(others)))
                prefix, text = render_topic_prompt(template, by_name[name], shown)
                rid = f"topic-r{rnd}-{name}-{j:04d}"
                requests.append(Request(rid, prefix, text))
                shown_n[rid] = (name, len(shown))
        raw = gens.run(f"topics-r{rnd}", requests, sampling)
        for req in requests:
            name, n_shown = shown_n[req.id]
            rec = raw[req.id]
            for j, topic in enumerate(parse_topics(rec["completion"], n_shown + 1, rec["finish"], cfg.topic_max_lines)):
                tid = f"{req.id}-{j:02d}"
                reason = "topic_malformed" if topic is None else apply_filters(topic, predicates[name])
                if reason is not None:
                    rejects.append(Reject(id=tid, stage=STAGE, reason=reason, text=topic or ""))
                    continue
                topics[name].append(Topic(id=tid, type=name, topic=topic, round=rnd, source_id=req.id,
                                          generator=generator))
        topics, dropped_ids = balance_topics(topics, cfg.max_topics_per_type, cfg.balance_topics, rejects)
        sizes.append(min(len(pool) for pool in topics.values()))
        log.info("topics round %d: %d prompts, %d dropped by dedup/balance, pool %d per type",
                 rnd, len(requests), dropped_ids, sizes[-1])
    return [t for pool in topics.values() for t in pool], sizes


def _questions(cfg: RedTeamConfig, types: list[RedTeamType], topics: list[Topic], gens: GenerationCache,
               sampling: SamplingParams, generator: Generator, rejects: list[Reject]) -> list[Prompt]:
    rng = random.Random(f"{cfg.seed}-questions")
    template = read_template(cfg.question_template)
    by_name = {t.name: t for t in types}
    # seed pairs already have a human question; only brainstormed pairs get a generated one
    pairs = [(by_name[t.type], t) for t in topics if t.round > 0]
    rng.shuffle(pairs)
    requests, asked = [], {}
    for i in range(0, len(pairs), cfg.new_hints):
        chunk = pairs[i:i + cfg.new_hints]
        seeds = rng.sample(types, min(cfg.seed_hints, len(types)))
        named = [(t, topic.topic) for t, topic in chunk]
        rid = f"rt-{i // cfg.new_hints:06d}"
        if cfg.question_per_pair:
            prefix, texts = render_question_prompts(template, seeds, named)
            for j, text in enumerate(texts):
                requests.append(Request(f"{rid}-{j}", prefix, text))
                asked[f"{rid}-{j}"] = [chunk[j]]
        else:
            prefix, text = render_question_prompt(template, seeds, named)
            requests.append(Request(rid, prefix, text))
            asked[rid] = chunk
    raw = gens.run("red_team", requests, sampling)
    candidates = []
    for req in requests:
        rec, chunk = raw[req.id], asked[req.id]
        opener = req.text[req.text.rfind("\n") + 1:]
        found = parse_questions(rec["completion"], opener, rec["finish"],
                                [(t.description, topic.topic) for t, topic in chunk])
        for j, (rt_type, topic) in enumerate(chunk):
            pid = req.id if cfg.question_per_pair else f"{req.id}-{j}"
            question = found.get((rt_type.description, topic.topic))
            if question is None:
                rejects.append(Reject(id=pid, stage=STAGE, reason="no_question", text=f"{rt_type.name}: {topic.topic}"))
                continue
            candidates.append(Prompt(id=pid, text=question, source="red_team", type=rt_type.name,
                                     topic=topic.topic, seed_ids=[topic.id], generator=generator))
    # a question copying a seed question (the model echoes its examples) or another kept one is a near duplicate
    kept = filter_novel(candidates, [instruction_length(cfg.min_words, cfg.max_words), starts_cleanly],
                        [(f"seed-{t.name}", t.question) for t in types], cfg.rouge_threshold, rejects)
    log.info("red-team: %d pairs in %d prompts -> %d questions", len(pairs), len(requests), len(kept))
    return kept


# ---------------------------------------------------------------------------------------------- run
def build_engine(config: Config, model_dir: str | Path) -> Engine:
    """The base model's engine (``generation.*``), loaded in ``model.dtype`` like every stage's."""
    from selfalign.generation import engine_for

    return engine_for(config, model_dir)


def _generation_cache(config: Config, model_dir: Path, raw_dir: Path,
                      engine_factory: Callable[[], Engine] | None) -> GenerationCache:
    """The raw cache; the engine is built only if some phase is not cached already (default:
    :func:`build_engine` on ``model_dir``)."""
    if engine_factory is None:
        engine_factory = partial(build_engine, config, model_dir)
    return GenerationCache(engine_factory, raw_dir, _raw_fingerprint(config, model_dir))


def _write_outputs(out_dir: Path, merged: list[Prompt], topics: list[Topic], rejects: list[Reject]) -> None:
    write_jsonl(out_dir / "self_instruct.jsonl", [p for p in merged if p.source == "self_instruct"])
    write_jsonl(out_dir / "red_team.jsonl", [p for p in merged if p.source == "red_team"])
    write_jsonl(out_dir / "topics.jsonl", topics)
    write_jsonl(out_dir / "all.jsonl", merged)
    write_jsonl(out_dir / "rejects.jsonl", rejects)


def _metrics(merged: list[Prompt], seeds: list[SeedTask], types: list[RedTeamType], topics: list[Topic],
             pool_sizes: list[int], rejects: list[Reject], gens: GenerationCache, wall: float) -> dict[str, Any]:
    final_si = [p for p in merged if p.source == "self_instruct"]
    final_rt = [p for p in merged if p.source == "red_team"]
    return {
        "counts": {"self_instruct": len(final_si), "red_team": len(final_rt), "all": len(merged),
                   "seeds": len(seeds), "types": len(types), "topics": len(topics),
                   "rejects": len(rejects)},
        "per_type": dict(sorted(Counter(p.type for p in final_rt).items())),
        "rejects": count_reasons(r.reason for r in rejects),
        "topic_pool_min_per_type_by_round": pool_sizes,
        "topics_per_type": dict(sorted(Counter(t.type for t in topics).items())),
        "generated_tokens": gens.tokens,
        "generation_s": round(gens.gen_seconds, 2),
        "wall_time_s": round(wall, 2),
    }


def run(config: Config, model_dir: str | Path, benchmarks_dir: str | Path, out_dir: str | Path,
        raw_dir: str | Path, metrics_path: str | Path,
        engine_factory: Callable[[], Engine] | None = None) -> dict[str, Any]:
    """Generate, filter and merge step-1 prompts; write ``out_dir`` files and the metrics JSON.

    ``engine_factory`` builds the engine lazily (only if some generation is not cached already);
    default: :func:`build_engine` on ``model_dir``."""
    start = time.perf_counter()
    cfg = config.red_team
    model_dir, out_dir, raw_dir = Path(model_dir), Path(out_dir), Path(raw_dir)
    seeds = load_seed_tasks(cfg.seed_tasks_file)
    types = load_types(cfg.types_file)
    bench = evaluation_questions(benchmarks_dir, config.evaluate.probes.dir)
    eos = load_tokenizer(model_dir, trust_remote_code=config.model.trust_remote_code).eos_token
    model_id = model_provenance_id(model_dir)
    gens = _generation_cache(config, model_dir, raw_dir, engine_factory)
    rejects: list[Reject] = []

    def gen_for(s: SamplingParams) -> Generator:
        return Generator(model=model_id, sampling=s.to_dict(), seed=cfg.seed, engine=config.generation.engine)

    si_sampling = _sampling(cfg, eos, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    topic_sampling = _sampling(cfg, eos, cfg.topic_temperature, cfg.top_p, cfg.topic_max_new_tokens, cfg.topic_stop,
                               cfg.topic_ngram_penalties)
    q_sampling = _sampling(cfg, eos, cfg.question_temperature, cfg.question_top_p, cfg.question_max_new_tokens,
                           cfg.question_stop)
    self_instruct = _self_instruct(cfg, seeds, gens, si_sampling, gen_for(si_sampling), rejects)
    topics, pool_sizes = _grow_topics(cfg, types, gens, topic_sampling, gen_for(topic_sampling), rejects)
    red_team = _questions(cfg, types, topics, gens, q_sampling, gen_for(q_sampling), rejects)
    merged, merge_rejects = merge_prompts([self_instruct, red_team], bench, cfg.contamination_rouge, cfg.seed)
    rejects.extend(merge_rejects)

    _write_outputs(out_dir, merged, topics, rejects)
    gens.prune()
    metrics = _metrics(merged, seeds, types, topics, pool_sizes, rejects, gens, time.perf_counter() - start)
    write_json(metrics_path, metrics)
    log.info("red_team: %s", json.dumps(metrics["counts"]))
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/base", help="base model directory")
    parser.add_argument("--benchmarks", default="data/benchmarks", help="normalised benchmark JSONL directory")
    parser.add_argument("--out", default="data/prompts", help="output directory for prompt JSONL files")
    parser.add_argument("--raw", default="data/prompts/raw", help="raw generations (resumable, persisted)")
    parser.add_argument("--metrics", default="metrics/red_team.json", help="metrics JSON path")


def main(args: argparse.Namespace, config: Config) -> None:
    run(config, args.model, args.benchmarks, args.out, args.raw, args.metrics)
