"""Resumable generation: results are appended per batch and fsync'd, so a killed run loses nothing.

``run_resumable`` is how every stage generates: it skips request ids already in
``<out>.partial.jsonl`` (from a killed run), appends each new record as the engine yields it, and
only when every request has a record writes ``out_path`` atomically in request order and removes the
partial file. DVC therefore never sees a half-written output, and a rerun after SIGKILL neither
duplicates nor loses a record.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from selfalign.generation.base import Engine, Request, Result, SamplingParams
from selfalign.io import ResumableWriter

log = logging.getLogger(__name__)

__all__ = ["partial_path", "run_resumable"]

MakeRecord = Callable[[Request, Result], dict[str, Any]]


def partial_path(out_path: str | Path) -> Path:
    """Where finished records of an unfinished run live: ``raw.jsonl`` -> ``raw.partial.jsonl``."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.partial.jsonl")


def _default_record(request: Request, result: Result) -> dict[str, Any]:
    return result.to_dict()


def run_resumable(engine: Engine, requests: Sequence[Request], sampling: SamplingParams, out_path: str | Path,
                  *, make_record: MakeRecord | None = None, desc: str = "generate") -> list[dict[str, Any]]:
    """Generate every request not yet done, append records as they come, finalize atomically.

    ``make_record(request, result)`` builds the stored record (default ``Result.to_dict()``); it must
    carry ``"id" == request.id``. Returns all records in request order.
    """
    make_record = make_record or _default_record
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{desc}: duplicate request id {dup!r}")
    by_id = {r.id: r for r in requests}
    writer = ResumableWriter(partial_path(out_path))
    try:
        stale = writer.done_ids - set(by_id)
        if stale:
            log.warning("%s: %d records in %s belong to no current request; they are dropped at the end",
                        desc, len(stale), writer.path)
        todo = [r for r in requests if r.id not in writer.done_ids]
        done = len(requests) - len(todo)
        if done:
            log.info("%s: resuming, %d/%d already done in %s", desc, done, len(requests), writer.path)
        t0, new_tokens = time.perf_counter(), 0
        with tqdm(total=len(requests), initial=done, desc=desc, unit="req", dynamic_ncols=True) as bar:
            if todo:
                for result in engine.generate(todo, sampling):
                    req = by_id.get(result.id)
                    if req is None:
                        raise RuntimeError(f"{desc}: engine returned unknown id {result.id!r}")
                    record = make_record(req, result)
                    if str(record.get("id")) != req.id:
                        raise ValueError(f"{desc}: make_record must keep id {req.id!r}, got {record.get('id')!r}")
                    writer.write_batch([record])
                    new_tokens += result.completion_tokens
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
        missing = [i for i in ids if i not in writer.records]
        if missing:
            raise RuntimeError(f"{desc}: engine returned no result for {len(missing)} requests, e.g. {missing[0]!r}")
        return writer.finalize(out_path, order=ids)
    finally:
        writer.close()
