"""A persisted cache of raw generations for a stage that generates in several phases (red_team).

Each phase's request set is generated through :func:`selfalign.generation.runner.run_resumable` (the
same fingerprinted, resumable writer every stage uses) into ``<raw_dir>/<phase>-<digest>.jsonl``, where
the digest is the full resume fingerprint (the caller's fingerprint + the phase's requests + sampling;
:func:`~selfalign.generation.runner.resume_fingerprint`, the one ``run_resumable`` checks a partial
file against). So a finished phase is read back only when model, engine code and libraries, the
caller's code, the annotation files, sampling and every request are unchanged; an interrupted phase
continues from its ``.partial.jsonl``; :meth:`GenerationCache.prune` deletes files of other fingerprints.

Why a layer over ``run_resumable`` rather than ``run_resumable`` alone: it finalizes a phase into a
file and forgets its fingerprint, so a rerun after a kill in phase 3 would regenerate phases 1-2. Here
the fingerprint is in the file name, so finished phases of a killed run are reused (``raw_dir`` is a
DVC ``persist`` output) and a changed parameter never reuses stale completions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

from selfalign.generation.base import Engine, Request, Result, SamplingParams
from selfalign.generation.runner import (
    fingerprint_digest,
    fingerprint_path,
    partial_path,
    resume_fingerprint,
    run_resumable,
)
from selfalign.io import DataError, read_jsonl

__all__ = ["GenerationCache", "raw_record"]


def raw_record(req: Request, res: Result) -> dict[str, Any]:
    """The stored record of one generation: the request text and the raw completion with its counts."""
    return {"id": req.id, "prompt": req.text, "completion": res.text, "finish": res.finish,
            "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens}


class GenerationCache:
    """Runs request sets through an engine built on first need, with fingerprinted raw files in ``raw_dir``.

    ``tokens`` (completion tokens of every request asked for, cached or not) and ``gen_seconds`` (time
    spent generating, not reading back) are the stage's generation metrics."""

    def __init__(self, engine_factory: Callable[[], Engine], raw_dir: Path, fingerprint: Mapping[str, Any]):
        self._factory = engine_factory
        self._engine: Engine | None = None
        self.raw_dir = raw_dir
        self.fingerprint = fingerprint
        self.used: set[str] = set()
        self.tokens = 0
        self.gen_seconds = 0.0

    def run(self, phase: str, requests: list[Request], sampling: SamplingParams) -> dict[str, dict]:
        """``{request id: raw record}`` of one phase, read back when finished before, else generated."""
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
                                    make_record=raw_record, desc=phase)
            self.gen_seconds += time.perf_counter() - start
        by_id = {r["id"]: r for r in records}
        missing = [r.id for r in requests if r.id not in by_id]
        if missing:
            raise DataError(f"{path}: missing generations for {missing[:3]}")
        self.tokens += sum(by_id[r.id]["completion_tokens"] for r in requests)
        return by_id

    def prune(self) -> None:
        """Delete every raw file this run did not use (other fingerprints: stale parameters or code)."""
        for p in [*self.raw_dir.glob("*.jsonl"), *self.raw_dir.glob("*.json")]:
            if p.name not in self.used:
                p.unlink()
