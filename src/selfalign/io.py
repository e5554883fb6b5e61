"""File I/O shared by all stages: atomic writes, JSONL and YAML reads whose errors name file and line,
resumable appends.

Why atomic writes: DVC hashes outputs after a stage exits; a half-written file left by a killed run
must never look like a finished output. Why fsync'd appends: generation stages are resumable, and a
record that was reported done must survive a SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = [
    "DataError",
    "ResumableWriter",
    "atomic_write_text",
    "load_yaml",
    "parse_yaml",
    "iter_jsonl",
    "read_jsonl",
    "read_records",
    "sha256_file",
    "sha256_text",
    "write_json",
    "write_jsonl",
    "yaml_error_message",
]

M = TypeVar("M", bound=BaseModel)


class DataError(ValueError):
    """An input file that cannot be used; the message names the file, line and field."""


class UserError(RuntimeError):
    """An error caused by the user's input or environment (a missing model, a bad flag, an unreachable
    endpoint); the CLI shows it as one line with exit code 2. It lives here, with :class:`DataError`, so
    library code raises it without importing the CLI."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same directory + rename (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dump(record: Any) -> str:
    if isinstance(record, BaseModel):
        return record.model_dump_json()
    return json.dumps(record, ensure_ascii=False, sort_keys=False)


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Atomically write records (dicts or pydantic models) as JSONL; returns the count."""
    lines = [_dump(r) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line, so that every error about a record,
    malformed JSON or a bad field, names the line an editor jumps to. A malformed line raises
    :class:`DataError` naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno}: expected a JSON object")
            yield lineno, obj


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield JSON objects (:func:`iter_jsonl` without the line numbers)."""
    for _, obj in iter_jsonl(path):
        yield obj


def parse_yaml(text: str, source: str | Path, error: type[Exception] = DataError) -> Any:
    """``yaml.safe_load(text)``; a syntax error raises ``error`` as ``<source>: line N: invalid YAML: <problem>``.

    The one place PyYAML's exceptions become the project's one-line messages, so the annotation, the
    probe sets and params.yaml all name a bad file and line the same way. ``error`` is the caller's
    exception class (:class:`DataError` for data, ``ConfigError`` for params)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(yaml_error_message(exc, source)) from None


def yaml_error_message(exc: Exception, source: str | Path) -> str:
    """``<source>: line N: invalid YAML: <problem>`` for a PyYAML or ruamel.yaml error (both carry a
    0-based ``problem_mark``), so every YAML file the project reads reports a syntax error alike."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{source}: {where}invalid YAML: {problem}"


def load_yaml(path: str | Path, error: type[Exception] = DataError) -> Any:
    """Read and parse a YAML file (:func:`parse_yaml`); a missing file raises ``error``: ``<path>: file not found``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    return parse_yaml(text, path, error)


def read_records(path: str | Path, model: type[M]) -> list[M]:
    """Read JSONL into validated records; errors name file, line and field."""
    out = []
    for lineno, obj in iter_jsonl(path):
        try:
            out.append(model.model_validate(obj))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "<record>"
            raise DataError(f"{path}: line {lineno}: field '{field}': {err['msg']}") from None
    return out


class ResumableWriter:
    """Append-only JSONL keyed by ``id``: records are flushed and fsync'd per batch.

    On open, already-present ids are loaded (a torn last line from a SIGKILL is discarded and the file
    truncated to the last complete record), so a rerun skips finished work, never duplicates a record
    and never loses one that was written. :meth:`finalize` atomically writes the final file, ordered
    as the caller asks.
    """

    def __init__(self, partial_path: str | Path, key: str = "id"):
        self.path = Path(partial_path)
        self.key = key
        self.records: dict[str, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._recover()
        self._fh = open(self.path, "a", encoding="utf-8")

    def _recover(self) -> None:
        good_bytes = 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn tail from a kill mid-write
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError:
                    break
                self.records.setdefault(str(obj[self.key]), obj)
                good_bytes += len(raw)
        with open(self.path, "r+b") as f:
            f.truncate(good_bytes)

    @property
    def done_ids(self) -> set[str]:
        return set(self.records)

    def write_batch(self, records: Iterable[dict[str, Any]]) -> int:
        n = 0
        for rec in records:
            rid = str(rec[self.key])
            if rid in self.records:
                continue
            self.records[rid] = rec
            self._fh.write(_dump(rec) + "\n")
            n += 1
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return n

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def finalize(self, final_path: str | Path, order: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Write the final file atomically (in ``order`` if given) and remove the partial file."""
        self.close()
        ids = list(order) if order is not None else list(self.records)
        recs = [self.records[i] for i in ids if i in self.records]
        write_jsonl(final_path, recs)
        self.path.unlink(missing_ok=True)
        return recs

    def __enter__(self) -> "ResumableWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
