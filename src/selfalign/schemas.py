"""Record types exchanged between stages (JSONL, one object per line, UTF-8). One place for all.

Every record carries an ``id`` and, where it was produced by a model, a ``generator`` block
(model, adapter hash, sampling params, seed) so any line can be traced to what made it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Generator(_Record):
    """Provenance of a generated record."""

    model: str
    adapter: str | None = None
    adapter_sha256: str | None = None
    sampling: dict[str, Any] = {}
    seed: int | None = None
    engine: str = "hf"


class Prompt(_Record):
    """A synthetic prompt from step 1 (``data/prompts/*.jsonl``)."""

    id: str
    text: str
    input: str = ""
    source: Literal["self_instruct", "red_team"]
    type: str | None = None
    topic: str | None = None
    seed_ids: list[str] = []
    generator: Generator | None = None


class Topic(_Record):
    """A red-teaming topic of one adversarial type (``data/prompts/topics.jsonl``); ``round`` 0 is
    the human seed topic, later rounds were brainstormed by the model in request ``source_id``."""

    id: str
    type: str
    topic: str
    round: int
    source_id: str | None = None
    generator: Generator | None = None


class AlignedResponse(_Record):
    """A step-2 answer with its internal thought (``data/self_align/raw.jsonl``)."""

    id: str
    prompt_id: str
    thought: str
    response: str
    principles_cited: list[str] = []
    finish: Literal["stop", "length"]
    generator: Generator
    prompt_sha256: str | None = None
    principle_set_sha256: str | None = None
    excluded: list[str] = []
    # the verbatim completion (thought + answer + whatever followed), so filters can be re-run
    output: str = ""


class TrainingExample(_Record):
    """One SFT pair for engrave / verbose_clone (``data/*/train.jsonl``)."""

    id: str
    prompt: str
    response: str
    source_stage: str
    # False = the answer was cut by the token limit: the trainer must not teach an end marker after it
    complete: bool = True


class Reject(_Record):
    """Every dropped record lands in a rejects file with its reason."""

    id: str
    stage: str
    reason: str
    text: str


class EvalSample(_Record):
    """One evaluated benchmark item (``eval/samples/<variant>/*.jsonl``)."""

    benchmark: str
    id: str
    variant: str
    prediction: Any
    correct: bool | None
    scores: Any = None
