"""Resumable generation: results are appended per batch and fsync'd, so a killed run loses nothing.

``run_resumable`` is how every stage generates: it skips request ids already in
``<out>.partial.jsonl`` (from a killed run), appends each new record as the engine yields it, and
only when every request has a record writes ``out_path`` atomically in request order and removes the
partial file. DVC therefore never sees a half-written output, and a rerun after SIGKILL neither
duplicates nor loses a record.

A partial file is only resumed when it was written under the same *fingerprint*: everything a stored
record depends on (model and adapter weights, sampling, every request's text, the engine and
record-building code, library versions; see :func:`generation_fingerprint`). The fingerprint lives in a
sidecar ``<out>.partial.fingerprint.json`` written before the first record, so a partial without one
(a kill before it existed, or older code) or with another one is discarded, never mixed in. The
sidecar keeps the partial file itself a plain JSONL of records, the same format as the output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from tqdm import tqdm

from selfalign.config import GenerationConfig
from selfalign.generation.base import Engine, Request, Result, SamplingParams
from selfalign.io import ResumableWriter, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

__all__ = [
    "ENGINE_CODE",
    "fingerprint_digest",
    "fingerprint_path",
    "generation_fingerprint",
    "model_identity",
    "partial_path",
    "requests_sha256",
    "resume_fingerprint",
    "run_resumable",
    "source_sha256",
]

MakeRecord = Callable[[Request, Result], dict[str, Any]]

# code and libraries that turn a request into a completion, per ``generation.engine`` (the modules
# make_engine builds each engine from; named here because red_team keys its cache before building one).
# Exactly the modules each engine imports, function-level ones included (config and io aside): vLLM loads
# its model and tokenizer itself and imports lm-eval's tokenisation (encoding.py) for its log-likelihoods;
# the OpenAI engine loads the local tokenizer (models.py) that maps its logit-bias strings to ids.
ENGINE_CODE: dict[str, tuple[str, ...]] = {
    "hf": ("selfalign.generation.attention", "selfalign.generation.base", "selfalign.generation.encoding",
           "selfalign.generation.hf", "selfalign.generation.sampling", "selfalign.models"),
    "vllm": ("selfalign.generation.base", "selfalign.generation.encoding", "selfalign.generation.vllm"),
    "openai": ("selfalign.generation.base", "selfalign.generation.openai", "selfalign.models"),
}
ENGINE_LIBRARIES: dict[str, tuple[str, ...]] = {
    "hf": ("torch", "transformers", "peft", "tokenizers"),
    "vllm": ("torch", "transformers", "peft", "tokenizers", "vllm"),
    "openai": ("transformers", "tokenizers"),
}


def partial_path(out_path: str | Path) -> Path:
    """Where finished records of an unfinished run live: ``raw.jsonl`` -> ``raw.partial.jsonl``."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.partial.jsonl")


def fingerprint_path(out_path: str | Path) -> Path:
    """The partial file's fingerprint sidecar: ``raw.jsonl`` -> ``raw.partial.fingerprint.json``."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.partial.fingerprint.json")


# ---------------------------------------------------------------------------------- fingerprints
def source_sha256(modules: Iterable[str]) -> str:
    """sha256 over the source files of the named modules (sorted by name, so order does not matter).

    Why source text and not a version string: nobody bumps a version when editing a parser, and a
    record built by other code must not be resumed as if it were current."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            raise ValueError(f"fingerprint code: {name!r} is not a Python source module")
        h.update(f"{name}\0".encode())
        h.update(Path(spec.origin).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def model_identity(model_dir: str | Path) -> str:
    """A content identity of a model directory, not its path (``models/base`` is re-made in place).

    ``provenance.json`` (written by prepare_model: source, GGUF sha256, dtype) plus ``config.json`` when
    present; otherwise the config and every weight file are hashed (a hand-made directory, the tests'
    tiny model). A directory with none of these (an engine injected by a test) is named by its path:
    a real run has already failed to load such a model."""
    root = Path(model_dir)
    h = hashlib.sha256()
    names = ["provenance.json", "config.json"] if (root / "provenance.json").exists() else \
        ["config.json", *sorted(p.name for p in root.glob("*.safetensors"))]
    found = [n for n in names if (root / n).exists()]
    if not found:
        return f"path:{root}"
    for name in found:
        h.update(f"{name}\0{sha256_file(root / name)}\0".encode())
    return h.hexdigest()


def _library_versions(names: Iterable[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def generation_fingerprint(gen: GenerationConfig, model_dir: str | Path, *, code: Sequence[str],
                           adapter_dir: str | Path | None = None, dtype: str = "float32",
                           files: Mapping[str, str | Path] | None = None) -> dict[str, Any]:
    """What a stage's generated records depend on besides their requests and sampling.

    ``code``: the modules that build the stored records from completions (the stage's parser /
    ``make_record``); the engine's own modules are added here. ``files``: annotation files the
    requests are rendered from (hashed by content; the key names them, so paths may differ between
    machines). Performance knobs (batch size, threads, prefix cache) are left out: per-row seeds make
    them irrelevant to what is sampled. :func:`run_resumable` adds the requests and the sampling."""
    from selfalign.models import adapter_sha256

    engine: dict[str, Any] = {
        "name": gen.engine,
        "code_sha256": source_sha256(ENGINE_CODE[gen.engine]),
        "libraries": _library_versions(ENGINE_LIBRARIES[gen.engine]),
        "max_context": gen.max_context,
        "min_new_tokens_reserved": gen.min_new_tokens_reserved,
        "overflow": gen.overflow,
        "dtype": dtype,
    }
    if gen.engine == "openai":  # the weights live on the server: its name is all we know of them
        engine["served_model"] = f"{gen.openai.base_url} {gen.openai.model}"
    return {
        "model": model_identity(model_dir),
        "adapter_sha256": adapter_sha256(adapter_dir),
        "engine": engine,
        "code_sha256": source_sha256(code),
        "files_sha256": {k: sha256_file(v) for k, v in sorted((files or {}).items())},
    }


def requests_sha256(requests: Sequence[Request]) -> str:
    """One hash over every request's id, prefix and text, in order."""
    h = hashlib.sha256()
    for r in requests:
        h.update(json.dumps([r.id, r.prefix, r.text], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def resume_fingerprint(fingerprint: Mapping[str, Any], requests: Sequence[Request],
                       sampling: SamplingParams) -> dict[str, Any]:
    """The caller's fingerprint + the requests and sampling, as JSON would store it.

    Request ids are positional upstream (a re-run red_team reuses ``si-000001-02`` for another
    prompt), so every request's text is covered, not only the shared prefix."""
    full = {**fingerprint, "requests_sha256": requests_sha256(requests), "sampling": sampling.to_dict()}
    return json.loads(json.dumps(full, sort_keys=True))


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """A short stable name for a fingerprint (file names of red_team's raw cache)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _differing_keys(old: Any, new: Mapping[str, Any], prefix: str = "") -> list[str]:
    if not isinstance(old, dict):
        return ["<fingerprint>"]
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_keys(a, b, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def _discard_stale_partial(out_path: str | Path, fingerprint: dict[str, Any], desc: str) -> None:
    """Delete a partial file not written under ``fingerprint`` (with a warning naming what changed)."""
    part, side = partial_path(out_path), fingerprint_path(out_path)
    if not part.exists():
        return
    try:
        old = json.loads(side.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        old = None
    if old == fingerprint:
        return
    why = "it has no fingerprint" if old is None else f"changed: {', '.join(_differing_keys(old, fingerprint))}"
    log.warning("%s: discarding %s, written under another fingerprint (%s)", desc, part, why)
    part.unlink()
    side.unlink(missing_ok=True)


def _default_record(request: Request, result: Result) -> dict[str, Any]:
    return result.to_dict()


def run_resumable(engine: Engine, requests: Sequence[Request], sampling: SamplingParams, out_path: str | Path,
                  *, fingerprint: Mapping[str, Any], make_record: MakeRecord | None = None,
                  desc: str = "generate") -> list[dict[str, Any]]:
    """Generate every request not yet done, append records as they come, finalize atomically.

    ``fingerprint`` names what the records depend on (build it with :func:`generation_fingerprint`);
    a partial file from a run under another fingerprint is discarded, not resumed.
    ``make_record(request, result)`` builds the stored record (default ``Result.to_dict()``); it must
    carry ``"id" == request.id``. Returns all records in request order.
    """
    make_record = make_record or _default_record
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{desc}: duplicate request id {dup!r}")
    by_id = {r.id: r for r in requests}
    full = resume_fingerprint(fingerprint, requests, sampling)
    _discard_stale_partial(out_path, full, desc)
    # the sidecar exists before the first record, so a partial file never outlives its fingerprint
    atomic_write_text(fingerprint_path(out_path), json.dumps(full, indent=1, sort_keys=True) + "\n")
    writer = ResumableWriter(partial_path(out_path))
    try:
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
        records = writer.finalize(out_path, order=ids)
        fingerprint_path(out_path).unlink(missing_ok=True)
        return records
    finally:
        writer.close()
