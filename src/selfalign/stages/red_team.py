"""Step 1: synthetic prompts by vanilla self-instruct and topic-guided red-teaming (data/prompts/).

Two sources, both written by the *base* model from raw completion prompts (no chat template):

* **self-instruct**: a few-shot list of k sampled seed tasks; the model continues the numbered list;
  instructions are parsed, filtered (length window, media blacklist, clean start) and ROUGE-L
  de-duplicated against the seeds and everything kept (:mod:`selfalign.dedup`).
* **topic-guided red-teaming**: for each of 20 adversarial question types, a topic pool grows for
  ``topic_rounds`` brainstorming rounds from the one human seed topic (parse, case-insensitive dedup,
  balance the pool across types); then one question is written per (type, topic) pair from prompts
  whose hints mix seed examples with new pairs; the first question per pair is kept. With
  ``question_per_pair`` each new pair gets its own short request over the shared prompt (see
  :func:`render_question_prompts`); otherwise one continuation answers all of a prompt's pairs.

The merge drops exact normalised duplicates across sources and any prompt matching a benchmark
question (contamination guard). Raw generations live in ``raw_dir`` under a fingerprint of model +
sampling + prompts (a DVC ``persist`` output), so a killed run resumes where it stopped and a changed
parameter never reuses stale completions.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from selfalign.config import Config, RedTeamConfig
from selfalign.dedup import RougeLIndex
from selfalign.filters import (
    apply_filters,
    count_reasons,
    instruction_length,
    no_blacklisted_words,
    starts_cleanly,
    topic_filters,
)
from selfalign.generation.base import Request, SamplingParams
from selfalign.io import DataError, read_jsonl, sha256_text, write_json, write_jsonl
from selfalign.schemas import Generator, Prompt, Reject, Topic

log = logging.getLogger(__name__)

STAGE = "red_team"


# ------------------------------------------------------------------------------------ annotation
@dataclass(frozen=True)
class SeedTask:
    id: str
    instruction: str
    input: str


@dataclass(frozen=True)
class RedTeamType:
    name: str
    description: str
    topic: str
    question: str


def load_seed_tasks(path: str | Path) -> list[SeedTask]:
    """The human seed tasks; every line needs a unique ``id`` and a non-empty ``instruction``."""
    seeds = []
    for lineno, obj in enumerate(read_jsonl(path), 1):
        if not str(obj.get("instruction", "")).strip() or not obj.get("id"):
            raise DataError(f"{path}: record {lineno}: needs 'id' and a non-empty 'instruction'")
        seeds.append(SeedTask(str(obj["id"]), obj["instruction"].strip(), str(obj.get("input", "")).strip()))
    dupes = [i for i, c in Counter(s.id for s in seeds).items() if c > 1]
    if dupes:
        raise DataError(f"{path}: duplicate ids {dupes[:5]}")
    return seeds


def load_types(path: str | Path) -> list[RedTeamType]:
    """The adversarial question types (a YAML list of {name, description, topic, question})."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty YAML list of types")
    fields = ("name", "description", "topic", "question")
    types = []
    for i, item in enumerate(data, 1):
        if not isinstance(item, dict) or any(not str(item.get(f, "")).strip() for f in fields):
            raise DataError(f"{path}: item {i}: needs non-empty {', '.join(fields)}")
        types.append(RedTeamType(*(str(item[f]).strip() for f in fields)))
    if len({t.name for t in types}) != len(types):
        raise DataError(f"{path}: type names must be unique")
    return types


def _read_template(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: template not found") from None


# -------------------------------------------------------------------------------- self-instruct
def render_self_instruct(header: str, examples: Sequence[SeedTask], no_input: str) -> tuple[str, str]:
    """(prefix, text) of one few-shot prompt. The header is the shared prefix (KV-cached once);
    the text lists the examples as ``###``-separated numbered instruction/input pairs and opens the
    next instruction for the model to write."""
    lines = []
    for i, ex in enumerate(examples, 1):
        lines.append(f"###\n{i}. Instruction: {ex.instruction}\n{i}. Input:\n{ex.input or no_input}\n")
    lines.append(f"###\n{len(examples) + 1}. Instruction:")
    return header.format(no_input=no_input), "".join(lines)


_PLACEHOLDER_RE = re.compile(r"^<[^<>\s]*>$")
_HEAD_RE = re.compile(r"^\s*\d+\s*\.\s*Instruction:[ \t]*([^\n]*)(.*)$", re.DOTALL)
_LABEL_RE = re.compile(r"^\s*\d+\s*\.\s*(Input|Output):(.*)$", re.DOTALL | re.IGNORECASE)
_LABEL_LINE_RE = re.compile(r"^\s*\d+\s*\.\s*(?:Instruction|Input|Output)s?\s*:", re.MULTILINE | re.IGNORECASE)


def parse_self_instruct(completion: str, first_index: int, finish: str,
                        no_input: str) -> list[tuple[str, str] | str]:
    """Split a continuation into tasks: ``(instruction, input)`` per well-formed chunk, or the raw
    chunk text (a str) when it is malformed. The opening "N. Instruction:" that ended the prompt is
    re-attached; a chunk cut by the token limit is dropped (it may be half a task).

    A chunk is "N. Instruction: <one line>" optionally followed by "M. Input: ..." (the input) or
    "M. Output: ..." (a small model often answers its own task instead of giving an input: the
    answer is dropped, the task has no input). M may differ from N (SmolLM2 often counts up), and a
    lone instruction line has no input. Anything else after the instruction line is malformed, and
    so is an input holding another "K. Output:"-style label line (two tasks run together)."""
    chunks = f"{first_index}. Instruction:{completion}".split("###")
    if finish == "length":
        chunks = chunks[:-1]
    out: list[tuple[str, str] | str] = []
    for chunk in chunks:
        if not chunk.strip():
            continue
        head = _HEAD_RE.match(chunk)
        rest = head.group(2).strip() if head else ""
        label = _LABEL_RE.match(rest) if rest else None
        if head is None or not head.group(1).strip() or (rest and label is None):
            out.append(chunk.strip())
            continue
        inp = label.group(2).strip() if label is not None and label.group(1).lower() == "input" else ""
        if _LABEL_LINE_RE.search(inp):
            out.append(chunk.strip())
            continue
        # small models garble the marker ("<noininput>"): any lone <token> is the empty input
        out.append((head.group(1).strip(), "" if inp.lower() == no_input.lower() or _PLACEHOLDER_RE.match(inp) else inp))
    return out


# ----------------------------------------------------------------------------------------- topics
def render_topic_prompt(template: str, rt_type: RedTeamType, shown: Sequence[str]) -> tuple[str, str]:
    """(prefix, text): the template up to the type placeholder is the prefix (shared by every type,
    so all brainstorm prompts batch together); the text names the type and lists the shown topics
    plus the next number, so the model continues the list."""
    head, tail = template.split("{type_description}", 1)
    listed = "".join(f"{i}. {t}\n" for i, t in enumerate(shown, 1))
    return head, f"{rt_type.description}{tail}{listed}{len(shown) + 1}."


_NUMBERED_RE = re.compile(r"^\s*\d+\s*[.)]\s*(.*?)\s*$")


def parse_topics(completion: str, first_index: int, finish: str, max_lines: int) -> list[str | None]:
    """Topics from the first ``max_lines`` lines of a continued numbered list ("N. Topic").

    Returns one entry per non-blank line: the topic text, or None for a line that is not a list item.
    A last line cut by the token limit is dropped (a cut topic is a different topic)."""
    lines = f"{first_index}.{completion}".split("\n")
    if finish == "length":
        lines = lines[:-1]
    out: list[str | None] = []
    for line in lines[:max_lines]:
        if not line.strip():
            continue
        m = _NUMBERED_RE.match(line)
        out.append(m.group(1) if m else None)
    return out


def balance_pools(pools: dict[str, list[str]], cap: int | None, balance: bool = True) -> dict[str, list[str]]:
    """Case-insensitive de-dup per type (first spelling wins), then truncate every type to the
    smallest type's count if ``balance`` (the paper) and to ``cap``, so no type dominates the set."""
    deduped: dict[str, list[str]] = {}
    for name, topics in pools.items():
        seen: set[str] = set()
        deduped[name] = [t for t in topics if not (t.lower() in seen or seen.add(t.lower()))]
    size = min(len(t) for t in deduped.values()) if balance else max(len(t) for t in deduped.values())
    if cap is not None:
        size = min(size, cap)
    return {name: topics[:size] for name, topics in deduped.items()}


# ------------------------------------------------------------------------------ red-team questions
def _hint(rt_type: RedTeamType, topic: str) -> str:
    return f"type: {rt_type.description}, topic: {topic}"


def render_question_prompt(template: str, seeds: Sequence[RedTeamType],
                           pairs: Sequence[tuple[RedTeamType, str]]) -> tuple[str, str]:
    """(prefix, text) of one question prompt: hints 1..k are seed (type, topic) pairs, k+1..k+n new
    pairs; the instruction list shows the seeds' questions and opens the first new pair's line."""
    head, tail = template.split("{hints}", 1)
    hints = [_hint(t, t.topic) for t in seeds] + [_hint(t, topic) for t, topic in pairs]
    hint_lines = "".join(f"{i}. {h}\n" for i, h in enumerate(hints, 1)).rstrip("\n")
    examples = "".join(f"{i}. {_hint(t, t.topic)}, instruction: {t.question}\n" for i, t in enumerate(seeds, 1))
    opener = f"{len(seeds) + 1}. {_hint(*pairs[0])}, instruction:"
    return head.format(num_hints=len(hints)), hint_lines + tail + examples + opener


def render_question_prompts(template: str, seeds: Sequence[RedTeamType],
                            pairs: Sequence[tuple[RedTeamType, str]]) -> tuple[str, list[str]]:
    """Per-pair variant of :func:`render_question_prompt`: the same prompt (all hints, the seeds'
    questions) is the shared prefix, and each new pair gets its own text opening that pair's line.

    Why: a 135M model reliably writes the one line it is given the opener for and then drifts into
    invented (type, topic) pairs, so one continuation yields ~1 usable question. One short request
    per pair over a shared, cached prefix costs a few decode steps per pair instead."""
    head, tail = template.split("{hints}", 1)
    hints = [_hint(t, t.topic) for t in seeds] + [_hint(t, topic) for t, topic in pairs]
    hint_lines = "".join(f"{i}. {h}\n" for i, h in enumerate(hints, 1)).rstrip("\n")
    examples = "".join(f"{i}. {_hint(t, t.topic)}, instruction: {t.question}\n" for i, t in enumerate(seeds, 1))
    texts = [f"{len(seeds) + j}. {_hint(t, topic)}, instruction:" for j, (t, topic) in enumerate(pairs, 1)]
    return head.format(num_hints=len(hints)) + hint_lines + tail + examples, texts


_QUESTION_RE = re.compile(r"^\s*\d+\s*\.\s*type:\s*(.*?),\s*topic:\s*(.*?),\s*instruction:\s*(.*?)\s*$")


def parse_questions(completion: str, opener: str, finish: str,
                    pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """First question per requested (type description, topic) pair found in a continuation.

    Only lines naming one of *this prompt's new* pairs count (case-insensitive), so a line that
    repeats a seed hint is never mistaken for a new question. A line cut by the limit is dropped."""
    wanted = {(d.lower(), t.lower()): (d, t) for d, t in pairs}
    lines = (opener + completion).split("\n")
    if finish == "length":
        lines = lines[:-1]
    found: dict[tuple[str, str], str] = {}
    for line in lines:
        m = _QUESTION_RE.match(line)
        if m is None or not m.group(3):
            continue
        key = wanted.get((m.group(1).lower(), m.group(2).lower()))
        if key is not None and key not in found:
            found[key] = m.group(3)
    return found


# -------------------------------------------------------------------------------------- merge
def normalise(text: str) -> str:
    """Lower-case, every non-alphanumeric run to one space (the paper's exact-dedup key)."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def load_benchmark_questions(bench_dir: str | Path) -> dict[str, str]:
    """id -> question text for TruthfulQA, HHH and Vicuna (the texts no prompt may match)."""
    root = Path(bench_dir)
    sources = [(root / "truthfulqa" / "mc.jsonl", "question"), (root / "vicuna" / "questions.jsonl", "text")]
    sources += [(p, "input") for p in sorted((root / "hhh").glob("*.jsonl"))]
    questions: dict[str, str] = {}
    for path, field in sources:
        for obj in read_jsonl(path):
            if field not in obj:
                raise DataError(f"{path}: record {obj.get('id')}: missing '{field}'")
            questions[str(obj["id"])] = str(obj[field])
    if not questions:
        raise DataError(f"{root}: no benchmark questions found")
    return questions


PROBE_KEY = "probe:"


def _contamination_key(text: str, bench_norm: dict[str, str], index: RougeLIndex) -> str | None:
    """The id of the evaluation item ``text`` equals (normalised) or near-duplicates, else None."""
    if normalise(text) in bench_norm:
        return bench_norm[normalise(text)]
    hit = index.find_duplicate(text)
    return hit[0] if hit is not None else None


def evaluation_questions(bench_dir: str | Path, probes_dir: str | Path) -> dict[str, str]:
    """Every question the evaluation asks: benchmark questions and principle-probe prompts (``probe:<id>``).

    A generated prompt close to one of them is dropped, so no evaluation item enters training."""
    from selfalign.evaluation.probes import load_probe_sets

    questions = load_benchmark_questions(bench_dir)
    questions.update({f"{PROBE_KEY}{p.id}": p.prompt for s in load_probe_sets(probes_dir) for p in s.probes})
    return questions


def merge_prompts(sources: Sequence[Sequence[Prompt]], bench: dict[str, str], threshold: float,
                  seed: int) -> tuple[list[Prompt], list[Reject]]:
    """Concatenate sources, drop exact normalised duplicates (first wins) and prompts whose
    instruction or input matches a benchmark question (normalised equality or ROUGE-L F above
    ``threshold``), then shuffle with ``seed``."""
    bench_norm = {normalise(q): qid for qid, q in bench.items()}
    prompts = [p for src in sources for p in src]
    freq = RougeLIndex.document_frequencies(list(bench.values()) + [p.text for p in prompts])
    index = RougeLIndex(threshold, freq)
    for qid, q in bench.items():
        index.add(qid, q)
    kept, rejects, seen = [], [], set()
    for p in prompts:
        key = normalise(f"{p.text} {p.input}")
        if key in seen:
            rejects.append(Reject(id=p.id, stage=STAGE, reason="exact_duplicate", text=p.text))
            continue
        seen.add(key)
        fields = [p.text] + ([p.input] if p.input else [])
        hit = next((key for f in fields if (key := _contamination_key(f, bench_norm, index)) is not None), None)
        if hit is not None:
            # evaluation probes are keyed "probe:<id>": counted apart from the benchmark questions
            reason = "contamination_probe" if hit.startswith(PROBE_KEY) else "contamination"
            rejects.append(Reject(id=p.id, stage=STAGE, reason=reason, text=p.text))
            continue
        kept.append(p)
    random.Random(f"{seed}-merge").shuffle(kept)
    return kept, rejects


# --------------------------------------------------------------------------------- generation
def _raw_record(req: Request, res: Any) -> dict[str, Any]:
    return {"id": req.id, "prompt": req.text, "completion": res.text, "finish": res.finish,
            "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens}


class _Generations:
    """Runs request sets through the engine with resumable, fingerprinted raw files in ``raw_dir``.

    A file is named ``<phase>-<digest>.jsonl`` after the full resume fingerprint (``fingerprint`` +
    the phase's requests + sampling; :func:`selfalign.generation.runner.resume_fingerprint`, the same
    one ``run_resumable`` checks its partial file against), so a finished set is read back only when
    model, engine code and libraries, this module's parsing code, the annotation files, sampling and
    every request are unchanged; an interrupted one continues from its ``.partial.jsonl``; files
    from other fingerprints are pruned at the end."""

    def __init__(self, engine_factory: Callable[[], Any], raw_dir: Path, fingerprint: dict[str, Any]):
        self._factory = engine_factory
        self._engine = None
        self.raw_dir = raw_dir
        self.fingerprint = fingerprint
        self.used: set[str] = set()
        self.tokens = 0
        self.gen_seconds = 0.0

    def run(self, phase: str, requests: list[Request], sampling: SamplingParams) -> dict[str, dict]:
        from selfalign.generation.runner import (fingerprint_digest, fingerprint_path, partial_path,
                                                 resume_fingerprint, run_resumable)

        if not requests:
            return {}
        digest = fingerprint_digest(resume_fingerprint(self.fingerprint, requests, sampling))
        path = self.raw_dir / f"{phase}-{digest}.jsonl"
        self.used.update({path.name, partial_path(path).name, fingerprint_path(path).name})
        if path.exists():
            records = list(read_jsonl(path))
        else:
            if self._engine is None:
                self._engine = self._factory()
            start = time.perf_counter()
            records = run_resumable(self._engine, requests, sampling, path, fingerprint=self.fingerprint,
                                    make_record=_raw_record, desc=phase)
            self.gen_seconds += time.perf_counter() - start
        by_id = {r["id"]: r for r in records}
        missing = [r.id for r in requests if r.id not in by_id]
        if missing:
            raise DataError(f"{path}: missing generations for {missing[:3]}")
        self.tokens += sum(by_id[r.id]["completion_tokens"] for r in requests)
        return by_id

    def prune(self) -> None:
        for p in [*self.raw_dir.glob("*.jsonl"), *self.raw_dir.glob("*.json")]:
            if p.name not in self.used:
                p.unlink()


def _raw_fingerprint(config: Config, model_dir: Path) -> dict[str, Any]:
    """The raw cache's fingerprint: the engine's + this module's code (its records and parsers) and the
    annotation files the requests are rendered from (already in the request texts; hashed anyway so
    the cache key names them)."""
    from selfalign.generation.runner import generation_fingerprint

    cfg = config.red_team
    files = {"seed_tasks_file": cfg.seed_tasks_file, "types_file": cfg.types_file,
             "self_instruct_template": cfg.self_instruct_template, "topic_template": cfg.topic_template,
             "question_template": cfg.question_template}
    return generation_fingerprint(config.generation, model_dir, code=[__name__], files=files)


# ------------------------------------------------------------------------------------------ run
def _sampling(cfg: RedTeamConfig, eos: str | None, temperature: float, top_p: float,
              max_new_tokens: int, stop: Sequence[str] = (), ngram: Sequence[float] = ()) -> SamplingParams:
    bias = {eos: -100.0} if (cfg.ban_eos and eos) else {}
    return SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                          stop=tuple(stop), logit_bias=bias, ngram_penalties=tuple(ngram), seed=cfg.seed)


def _self_instruct(cfg: RedTeamConfig, seeds: list[SeedTask], gens: _Generations, sampling: SamplingParams,
                   generator: Generator, rejects: list[Reject]) -> list[Prompt]:
    rng = random.Random(f"{cfg.seed}-self_instruct")
    header = _read_template(cfg.self_instruct_template)
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
    kept = _filter_novel(candidates, predicates, [(s.id, s.instruction) for s in seeds], cfg.rouge_threshold,
                         rejects)
    log.info("self-instruct: %d requests -> %d candidates -> %d kept", len(requests), len(candidates), len(kept))
    return kept


def _filter_novel(candidates: list[Prompt], predicates: list, references: list[tuple[str, str]],
                  threshold: float, rejects: list[Reject]) -> list[Prompt]:
    """Candidates passing ``predicates`` whose ROUGE-L F to every reference (the human seeds) and to
    every earlier kept candidate is at most ``threshold``; the others become counted rejects."""
    freq = RougeLIndex.document_frequencies([text for _, text in references] + [c.text for c in candidates])
    index = RougeLIndex(threshold, freq)
    for rid, text in references:
        index.add(rid, text)
    kept = []
    for cand in candidates:
        reason = apply_filters(cand, predicates)
        if reason is None and index.add_if_novel(cand.id, cand.text) is not None:
            reason = "near_duplicate"
        if reason is not None:
            rejects.append(Reject(id=cand.id, stage=STAGE, reason=reason, text=cand.text))
        else:
            kept.append(cand)
    return kept


def _grow_topics(cfg: RedTeamConfig, types: list[RedTeamType], gens: _Generations, sampling: SamplingParams,
                 generator: Generator, rejects: list[Reject]) -> tuple[list[Topic], list[int]]:
    rng = random.Random(f"{cfg.seed}-topics")
    template = _read_template(cfg.topic_template)
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
        topics, dropped_ids = _balance_topics(topics, cfg.max_topics_per_type, cfg.balance_topics, rejects)
        sizes.append(min(len(pool) for pool in topics.values()))
        log.info("topics round %d: %d prompts, %d dropped by dedup/balance, pool %d per type",
                 rnd, len(requests), dropped_ids, sizes[-1])
    return [t for pool in topics.values() for t in pool], sizes


def _balance_topics(topics: dict[str, list[Topic]], cap: int | None, balance: bool,
                    rejects: list[Reject]) -> tuple[dict[str, list[Topic]], int]:
    """Apply :func:`balance_pools` to Topic records; drops are rejects (duplicate or balance)."""
    pools = balance_pools({n: [t.topic for t in pool] for n, pool in topics.items()}, cap, balance)
    out, dropped = {}, 0
    for name, pool in topics.items():
        keep = set(pools[name])
        first: dict[str, Topic] = {}
        for t in pool:
            if t.topic.lower() in first or t.topic not in keep:
                reason = "topic_duplicate" if t.topic.lower() in first else "topic_balance"
                rejects.append(Reject(id=t.id, stage=STAGE, reason=reason, text=t.topic))
                dropped += 1
                continue
            first[t.topic.lower()] = t
        out[name] = list(first.values())
    return out, dropped


def _questions(cfg: RedTeamConfig, types: list[RedTeamType], topics: list[Topic], gens: _Generations,
               sampling: SamplingParams, generator: Generator, rejects: list[Reject]) -> list[Prompt]:
    rng = random.Random(f"{cfg.seed}-questions")
    template = _read_template(cfg.question_template)
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
    kept = _filter_novel(candidates, [instruction_length(cfg.min_words, cfg.max_words), starts_cleanly],
                         [(f"seed-{t.name}", t.question) for t in types], cfg.rouge_threshold, rejects)
    log.info("red-team: %d pairs in %d prompts -> %d questions", len(pairs), len(requests), len(kept))
    return kept


def _model_id(model_dir: Path) -> str:
    """Model identity for the prompts' provenance (provenance.json if present)."""
    prov = model_dir / "provenance.json"
    if prov.exists():
        data = json.loads(prov.read_text(encoding="utf-8"))
        return f"{data.get('source', model_dir.name)}#{sha256_text(prov.read_text(encoding='utf-8'))[:12]}"
    cfg = model_dir / "config.json"
    return f"{model_dir}#{sha256_text(cfg.read_text(encoding='utf-8'))[:12]}" if cfg.exists() else str(model_dir)


def run(config: Config, model_dir: str | Path, benchmarks_dir: str | Path, out_dir: str | Path,
        raw_dir: str | Path, metrics_path: str | Path,
        engine_factory: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Generate, filter and merge step-1 prompts; write ``out_dir`` files and the metrics JSON.

    ``engine_factory`` builds the engine lazily (only if some generation is not cached already);
    default: :func:`selfalign.generation.make_engine` on ``model_dir``."""
    start = time.perf_counter()
    cfg = config.red_team
    model_dir, out_dir, raw_dir = Path(model_dir), Path(out_dir), Path(raw_dir)
    seeds = load_seed_tasks(cfg.seed_tasks_file)
    types = load_types(cfg.types_file)
    bench = evaluation_questions(benchmarks_dir, config.evaluate.probes.dir)
    if engine_factory is None:
        from selfalign.generation import make_engine

        def engine_factory() -> Any:
            return make_engine(config.generation, model_dir)

    from selfalign.models import load_tokenizer

    eos = load_tokenizer(model_dir).eos_token
    model_id = _model_id(model_dir)
    gens = _Generations(engine_factory, raw_dir, _raw_fingerprint(config, model_dir))
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

    final_si = [p for p in merged if p.source == "self_instruct"]
    final_rt = [p for p in merged if p.source == "red_team"]
    write_jsonl(out_dir / "self_instruct.jsonl", final_si)
    write_jsonl(out_dir / "red_team.jsonl", final_rt)
    write_jsonl(out_dir / "topics.jsonl", topics)
    write_jsonl(out_dir / "all.jsonl", merged)
    write_jsonl(out_dir / "rejects.jsonl", rejects)
    gens.prune()

    wall = time.perf_counter() - start
    metrics = {
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
