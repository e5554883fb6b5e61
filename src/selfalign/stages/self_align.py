"""Step 2: answer every synthetic prompt under the principle preamble, strip thoughts, filter.

The base model is used as a *base* model: a raw completion prompt (preamble + ``User: <query>`` +
the internal-thoughts tag), no chat template. It writes a thought that names the principles that
apply, then the answer. The thought is kept in ``raw.jsonl`` (with the cited principles) but never in
``train.jsonl``; answers go through the response filters of :mod:`selfalign.filters`, each drop
counted by reason. A refusal is kept only when judged: its thought cites the refusal principle and names a
harm, and the prompt is of a harmful red-team type (metrics ``refusals``). Identity answers from
``principles/identity.yaml`` are appended to the training data.
A share of the kept answers (``heldout_fraction``, by prompt-id hash) goes to ``heldout.jsonl`` instead:
never trained on, scored by ``engrave`` as held-out teacher answers.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from selfalign import filters
from selfalign.config import Config, SelfAlignConfig
from selfalign.generation.base import Engine, Request, Result, SamplingParams
from selfalign.io import atomic_write_text, read_records, sha256_text, write_json, write_jsonl
from selfalign.prompts.annotation import PreambleTemplate, load_from_config, load_identity
from selfalign.prompts.self_align import (
    active_principles,
    parse_cited,
    principle_set_sha256,
    query_text,
    render_preamble,
    split_completion,
)
from selfalign.schemas import AlignedResponse, Generator, Prompt, Reject, TrainingExample
from selfalign.splits import split_heldout

log = logging.getLogger(__name__)
STAGE = "self_align"


@dataclass(frozen=True)
class Preamble:
    """The rendered prefix and everything recorded about it on every record."""

    text: str
    sha256: str
    principle_set_sha256: str
    excluded: tuple[str, ...]
    names: tuple[str, ...]  # active principle names, in rendered order
    leaks: tuple[str, ...]  # exemplar-specific phrases an answer must not contain
    exemplar_answers: tuple[str, ...]  # every exemplar's answer: an answer must not recite one
    template: PreambleTemplate


@dataclass(frozen=True)
class Processed:
    """One completion after parsing and filtering; ``reason`` is None when it is kept."""

    thought: str
    answer: filters.Answer
    cited: list[str]
    reason: str | None


def build_preamble(cfg: SelfAlignConfig) -> Preamble:
    principles, exemplars, template = load_from_config(cfg)
    active = active_principles(principles, cfg.exclude)
    text = render_preamble(principles, exemplars, cfg.exclude, template)
    return Preamble(
        text=text,
        sha256=sha256_text(text),
        principle_set_sha256=principle_set_sha256(active),
        excluded=tuple(cfg.exclude),
        names=tuple(p.name for p in active),
        leaks=tuple(phrase for ex in exemplars for phrase in ex.leaks),
        exemplar_answers=tuple(ex.answer for ex in exemplars),
        template=template,
    )


def sampling_params(cfg: SelfAlignConfig, template: PreambleTemplate) -> SamplingParams:
    return SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        stop=_turn_end_markers(template) if cfg.stop_at_turn_end else (),
        logit_bias=dict(cfg.logit_bias),
        seed=cfg.seed,
    )


def _turn_end_markers(template: PreambleTemplate) -> tuple[str, ...]:
    """The next user turn starts a line: that is where a naturally finished answer ends."""
    return (f"\n{template.user_tag}",)


def _dialogue_tags(template: PreambleTemplate) -> tuple[str, ...]:
    return (template.user_tag, template.thought_tag, f"\n{template.answer_tag}", f"{template.answer_tag} ")


def response_filters(cfg: SelfAlignConfig, pre: Preamble, prompt: str, thought: str,
                     cited: Sequence[str], harmful: bool) -> list[filters.Predicate]:
    """Predicates over one cleaned answer, in the order their reasons are attributed.

    They judge the answer against its own prompt and thought: exemplar content counts as a leak only
    when the user did not ask about it, a principled behaviour must be one the thought called for, and a
    brief answer may pass when it is that behaviour (``self_align.behaviour_checks``). A refusal must
    moreover rest on a judgement the thought wrote down (``harm_judgement``) and answer a prompt that
    ``harmful`` says may be refused (:func:`asks_for_harm`); and such a prompt keeps nothing *but* a refusal
    (``drop_harmful_compliance``). Recited exemplar answers and looping answers are dropped before any of
    this: the do-no-harm check (issue 20) found the student looping more than the control after training on
    them.

    The checks are the same whichever principles an ablation excludes: an excluded principle cannot be
    cited, so an answer showing its behaviour is dropped as unjustified in the ablated arm too. Skipping the
    excluded principle's check instead would let the ablated arm keep that behaviour by reflex, and the
    ablation would no longer measure the principle's own effect."""
    checks = {k: tuple(v) for k, v in cfg.behaviour_checks.items()}
    refusal = checks[cfg.refusal_principle]
    # the fixed self-identification sentence ("... honest and harmless ...") is no judgement of this request
    judged_text = thought.replace(pre.template.self_id, "")
    return [
        filters.empty_answer,
        filters.contains_any(_dialogue_tags(pre.template), "leak_dialogue"),
        # a weak model often echoes its thought as the answer: the fixed sentences or its words betray it
        filters.contains_any((pre.template.self_id, pre.template.cite_intro), "thought_in_answer"),
        filters.echoes_thought(thought, cfg.thought_echo_rouge, cfg.thought_echo_openers),
        filters.leaks_exemplar(pre.leaks, prompt),
        # a verbatim run of an exemplar's answer ("I am a static model without a clock or internet access, so I
        # cannot tell ...") put under an unrelated prompt is recitation, not the principle's judgement
        filters.copies_any(pre.exemplar_answers, cfg.exemplar_copy_words, "copied_exemplar"),
        filters.repeats_chunk(cfg.loop_ngram_words, cfg.loop_min_count),
        filters.opens_with_any(cfg.apology_openers, "apology"),
        filters.unjustified_behaviour(checks, cited),
        filters.unjudged_refusal(refusal, cfg.harm_judgement, judged_text),
        filters.refusal_of_benign(refusal, harmful),
        filters.min_answer_chars_unless_principled(cfg.min_answer_chars, cfg.min_brief_answer_chars, checks, cited),
        *([filters.complies_with_harm(refusal, harmful)] if cfg.drop_harmful_compliance else []),
    ]


def followed_principles(cfg: SelfAlignConfig, answer: str, cited: Sequence[str]) -> list[str]:
    """The cited principles whose behaviour check the answer visibly passes (for the kept-data report)."""
    return [name for name in cited
            if name in cfg.behaviour_checks and filters.shows_behaviour(cfg.behaviour_checks[name], answer)]


def asks_for_harm(cfg: SelfAlignConfig, prompt: Prompt) -> bool:
    """May this prompt be refused? Only red-team prompts of a type in ``self_align.harmful_types``: a
    self-instruct task or a safe-but-alarming question answered with a refusal is over-refusal."""
    return prompt.source == "red_team" and prompt.type in cfg.harmful_types


def process(output: str, finish: str, cfg: SelfAlignConfig, pre: Preamble, prompt: str = "", *,
            harmful: bool = False) -> Processed:
    """Parse one completion (thought, answer, cited principles) and decide keep/reject. Never raises.

    ``prompt`` is the user's request (instruction + input): what an answer may legitimately repeat.
    ``harmful``: the prompt may be refused (:func:`asks_for_harm`); otherwise every refusal is dropped."""
    tpl = pre.template
    body, found_end = filters.cut_turn_end(output, _turn_end_markers(tpl))
    if not body.lstrip().startswith(tpl.self_id):
        return Processed("", filters.Answer(body.strip(), False), [], "no_thought_format")
    parts = split_completion(tpl, body)
    if parts is None:
        return Processed(body.strip(), filters.Answer("", False), parse_cited(body, pre.names), "no_answer_tag")
    thought, raw_answer = parts
    ended = finish == "stop" or found_end
    answer = filters.clean_answer(raw_answer, ended, (), cfg.repetition_min_chunk_chars)
    cited = parse_cited(thought, pre.names)
    reason = filters.apply_filters(answer, response_filters(cfg, pre, prompt, thought, cited, harmful))
    return Processed(thought, answer, cited, reason)


def select_prompts(prompts: Sequence[Prompt], limit: int | None) -> list[Prompt]:
    """All prompts, or ``limit`` of them taken round-robin over sources (file order within each).

    Why not the first ``limit`` lines: ``all.jsonl`` lists self-instruct prompts before red-team ones,
    so a plain head would align no adversarial prompt at all on a small budget."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    queues: dict[str, list[Prompt]] = {}
    for p in prompts:
        queues.setdefault(p.source, []).append(p)
    rounds = itertools.zip_longest(*(queues[k] for k in sorted(queues)))
    chosen = {p.id for p in [p for row in rounds for p in row if p is not None][:limit]}
    return [p for p in prompts if p.id in chosen]


def training_prompt_text(prompt: Prompt) -> str:
    """The user side of a training pair: the instruction, then its input after a blank line."""
    return prompt.text.strip() + (f"\n\n{prompt.input.strip()}" if prompt.input.strip() else "")


def _aligned(prompt: Prompt, output: str, finish: str, p: Processed, pre: Preamble, gen: Generator) -> AlignedResponse:
    return AlignedResponse(
        id=prompt.id, prompt_id=prompt.id, thought=p.thought, response=p.answer.text, principles_cited=p.cited,
        finish=finish, generator=gen, prompt_sha256=pre.sha256, principle_set_sha256=pre.principle_set_sha256,
        excluded=list(pre.excluded), output=output,
    )


def _citations_csv(counts: Counter, names: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["principle", "count"])
    for name in names:
        writer.writerow([name, counts.get(name, 0)])
    return buf.getvalue()


@dataclass
class Refusals:
    """What became of the answers that refuse (``behaviour_checks[refusal_principle]``)."""

    harmful_prompts: int = 0  # prompts that may be refused (asks_for_harm)
    total: int = 0
    kept_harmful: int = 0
    reasons: list[str] = field(default_factory=list)  # reject reasons of the dropped ones
    kept_by_source: Counter = field(default_factory=Counter)
    by_type: dict[str, Counter] = field(default_factory=dict)  # red-team type -> refusals total / kept

    def add(self, prompt: Prompt, harmful: bool, refusal: bool, reason: str | None) -> None:
        self.harmful_prompts += harmful
        red_team_type = prompt.type if prompt.source == "red_team" and prompt.type else None
        by_type = self.by_type.setdefault(red_team_type, Counter()) if red_team_type else Counter()
        if not refusal:
            return
        self.total += 1
        by_type["total"] += 1
        if reason is not None:
            self.reasons.append(reason)
            return
        self.kept_harmful += harmful
        self.kept_by_source[prompt.source] += 1
        by_type["kept"] += 1

    def metrics(self, reasons: Sequence[str], sources: Sequence[str]) -> dict[str, Any]:
        """``reasons`` are always reported (0 if none); ``sources``: every prompt source seen."""
        rejected = {r: 0 for r in reasons}
        rejected.update(filters.count_reasons(self.reasons))
        return {
            "harmful_prompts": self.harmful_prompts,
            "total": self.total,
            "kept_harmful": self.kept_harmful,
            "rejected": rejected,
            "kept_by_source": {s: self.kept_by_source.get(s, 0) for s in sorted(sources)},
            "by_type": {k: {"total": v.get("total", 0), "kept": v.get("kept", 0)}
                        for k, v in sorted(self.by_type.items())},
        }


_UNPARSED = ("no_thought_format", "no_answer_tag")  # no answer was parsed: nothing refused


def refused(cfg: SelfAlignConfig, p: Processed) -> bool:
    """Does the parsed answer refuse (``behaviour_checks[refusal_principle]``)?"""
    return p.reason not in _UNPARSED and filters.shows_behaviour(cfg.behaviour_checks[cfg.refusal_principle],
                                                                 p.answer.text)


@dataclass
class Decisions:
    """Every record re-parsed and judged, with the counts the metrics report."""

    raw: list[AlignedResponse] = field(default_factory=list)
    train: list[TrainingExample] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    cited_all: Counter = field(default_factory=Counter)
    cited_kept: Counter = field(default_factory=Counter)
    followed_kept: Counter = field(default_factory=Counter)  # kept rows visibly following a cited principle
    sources: dict[str, Counter] = field(default_factory=dict)
    refusals: Refusals = field(default_factory=Refusals)


def build_engine(config: Config, model_dir: str | Path) -> Engine:
    """The base model's engine (``generation.*``), loaded in ``model.dtype`` like every stage's."""
    from selfalign.generation import engine_for

    return engine_for(config, model_dir)


def _generate(config: Config, pre: Preamble, prompts: Sequence[Prompt], model_dir: str | Path, raw_path: Path,
              engine: Engine | None) -> tuple[list[dict], Generator]:
    """Every prompt's completion under the preamble (resumable, ``raw_path``) and the provenance stamp."""
    from selfalign.generation.runner import generation_fingerprint, run_resumable

    cfg = config.self_align
    if engine is None:
        engine = build_engine(config, model_dir)
    sampling = sampling_params(cfg, pre.template)
    gen = Generator(model=str(model_dir), sampling=sampling.to_dict(), seed=cfg.seed, engine=engine.name)
    by_id = {p.id: p for p in prompts}
    requests = [Request(p.id, pre.text, query_text(pre.template, p.text, p.input)) for p in prompts]

    def make_record(req: Request, res: Result) -> dict:
        prompt = by_id[req.id]
        p = process(res.text, res.finish, cfg, pre, training_prompt_text(prompt), harmful=asks_for_harm(cfg, prompt))
        return _aligned(prompt, res.text, res.finish, p, pre, gen).model_dump(mode="json")

    # a partial file resumes only under the same model, engine, parser code, preamble, prompts and sampling
    fingerprint = generation_fingerprint(config.generation, model_dir, code=[__name__, "selfalign.filters"],
                                         dtype=config.model.dtype)
    records = run_resumable(engine, requests, sampling, raw_path, fingerprint=fingerprint, make_record=make_record,
                            desc="self_align")
    return records, gen


def _decide(records: Sequence[dict], prompts: Sequence[Prompt], cfg: SelfAlignConfig, pre: Preamble,
            gen: Generator) -> Decisions:
    """Re-derive every decision from the verbatim output, so resumed records obey the current filters."""
    by_id = {p.id: p for p in prompts}
    d = Decisions()
    for rec in records:
        prompt = by_id[rec["id"]]
        harmful = asks_for_harm(cfg, prompt)
        p = process(rec["output"], rec["finish"], cfg, pre, training_prompt_text(prompt), harmful=harmful)
        d.raw.append(_aligned(prompt, rec["output"], rec["finish"], p, pre, gen))
        d.refusals.add(prompt, harmful, refused(cfg, p), p.reason)
        src = d.sources.setdefault(prompt.source, Counter())
        src["total"] += 1
        if p.reason != "no_thought_format":
            d.cited_all.update(p.cited)
        if p.reason is None:
            src["kept"] += 1
            d.cited_kept.update(p.cited)
            d.followed_kept.update(followed_principles(cfg, p.answer.text, p.cited))
            d.train.append(TrainingExample(id=prompt.id, prompt=training_prompt_text(prompt), response=p.answer.text,
                                           source_stage=STAGE, complete=p.answer.complete))
        else:
            d.reasons.append(p.reason)
            d.rejects.append(Reject(id=prompt.id, stage=STAGE, reason=p.reason, text=p.answer.text or rec["output"]))
    return d


def _metrics(d: Decisions, cfg: SelfAlignConfig, pre: Preamble, n_fit: int, n_heldout: int, n_identity: int,
             wall: float) -> dict[str, Any]:
    total, train, raw = len(d.raw), d.train, d.raw
    return {
        "total": total,
        "kept": len(train),
        "kept_fraction": round(len(train) / total, 4) if total else 0.0,
        "thought_format_fraction": round(sum(r.thought != "" for r in raw) / total, 4) if total else 0.0,
        "complete_fraction": round(sum(t.complete for t in train) / len(train), 4) if train else 0.0,
        "rejects": filters.count_reasons(d.reasons),
        "by_source": {k: dict(v) for k, v in sorted(d.sources.items())},
        "citations": {n: d.cited_all.get(n, 0) for n in pre.names},
        "citations_kept": {n: d.cited_kept.get(n, 0) for n in pre.names},
        # kept rows whose answer visibly follows a principle their thought cited (self_align.behaviour_checks)
        "followed_kept": {n: d.followed_kept.get(n, 0) for n in pre.names if n in cfg.behaviour_checks},
        # refusals: kept only on harmful prompts, when the thought cited the principle and judged harm
        "refusals": d.refusals.metrics(("refusal_benign", "unjudged_refusal", f"unjustified_{cfg.refusal_principle}"),
                                       list(d.sources)),
        "identity_examples": n_identity,
        "heldout": n_heldout,
        "train_examples": n_fit + n_identity,
        "prompt_sha256": pre.sha256,
        "principle_set_sha256": pre.principle_set_sha256,
        "excluded": list(pre.excluded),
        "wall_time_s": round(wall, 2),
    }


def run(
    config: Config,
    prompts_path: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    plot_path: str | Path,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Generate, parse and filter; write raw/train/rejects, prompt.txt, metrics and the citation plot."""
    start = time.perf_counter()
    cfg = config.self_align
    out_dir = Path(out_dir)
    log.info("self_align config: %s", cfg.model_dump_json())
    pre = build_preamble(cfg)
    identity = load_identity(cfg.identity_file)
    prompts = select_prompts(read_records(prompts_path, Prompt), cfg.limit)
    atomic_write_text(out_dir / "prompt.txt", pre.text)
    raw_path = out_dir / "raw.jsonl"
    records, gen = _generate(config, pre, prompts, model_dir, raw_path, engine)

    d = _decide(records, prompts, cfg, pre, gen)
    write_jsonl(raw_path, d.raw)
    # held-out answers (by prompt-id hash) are never trained on: engrave scores them (distillation metrics)
    fit, heldout = split_heldout(d.train, cfg.heldout_fraction)
    write_jsonl(out_dir / "train.jsonl", fit + identity)
    write_jsonl(out_dir / "heldout.jsonl", heldout)
    write_jsonl(out_dir / "rejects.jsonl", d.rejects)
    atomic_write_text(plot_path, _citations_csv(d.cited_all, pre.names))
    metrics = _metrics(d, cfg, pre, len(fit), len(heldout), len(identity), time.perf_counter() - start)
    write_json(metrics_path, metrics)
    log.info("self_align: kept %d/%d; rejects %s", len(d.train), len(d.raw), metrics["rejects"])
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", default="data/prompts/all.jsonl", help="step-1 prompts (JSONL)")
    parser.add_argument("--model", default="models/base", help="base model directory")
    parser.add_argument("--out", default="data/self_align", help="output directory (raw/train/rejects, prompt.txt)")
    parser.add_argument("--metrics", default="metrics/self_align.json", help="metrics JSON")
    parser.add_argument("--plot", default="plots/principle_citations.csv", help="principle citation counts (CSV)")


def main(args: argparse.Namespace, config: Config) -> None:
    run(config, args.prompts, args.model, args.out, args.metrics, args.plot)
