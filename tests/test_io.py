"""selfalign.io: JSONL/JSON round trips, errors that name file and line, sha256, atomic and resumable writes."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from selfalign.io import (
    DataError,
    ResumableWriter,
    atomic_write_text,
    iter_jsonl,
    read_jsonl,
    read_records,
    sha256_file,
    sha256_text,
    write_json,
    write_jsonl,
)
from selfalign.schemas import TrainingExample

RECORDS = [
    TrainingExample(id="a", prompt="Où est Paris ?", response="En France. 🇫🇷", source_stage="self_align"),
    TrainingExample(id="b", prompt="Line one\nline two", response='Quote " and \\ backslash', source_stage="identity",
                    complete=False),
]


# ------------------------------------------------------------------------------------------ round trips
def test_jsonl_round_trip_of_models_and_dicts(tmp_path):
    path = tmp_path / "deep" / "dir" / "train.jsonl"  # parent directories are created
    assert write_jsonl(path, RECORDS) == 2
    assert read_records(path, TrainingExample) == RECORDS
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and len(text.splitlines()) == 2  # one object per line, newlines escaped
    assert "Où" in text and "🇫🇷" in text  # UTF-8 as is, not \u escapes

    dicts = [{"id": 1, "x": [1.5, None, True]}, {"id": 2, "nested": {"k": "v"}}]
    write_jsonl(path, dicts)
    assert list(read_jsonl(path)) == dicts
    assert write_jsonl(path, []) == 0 and path.read_text() == "" and list(read_jsonl(path)) == []


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1}\n\n   \n{"id": 2}\n', encoding="utf-8")
    assert [r["id"] for r in read_jsonl(path)] == [1, 2]


def test_write_json_is_sorted_indented_and_newline_terminated(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"b": 1, "a": {"ü": 2.5}})
    text = path.read_text(encoding="utf-8")
    assert text == '{\n  "a": {\n    "ü": 2.5\n  },\n  "b": 1\n}\n'
    assert json.loads(text) == {"a": {"ü": 2.5}, "b": 1}


# ------------------------------------------------------------------------------------------ read errors
def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2,}\n{"id": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: invalid JSON"):
        list(read_jsonl(path))


def test_a_line_that_is_not_an_object_names_file_and_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"id": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl: line 2: expected a JSON object"):
        list(read_jsonl(path))


def test_missing_file_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.jsonl: file not found"):
        list(read_jsonl(tmp_path / "nothere.jsonl"))
    with pytest.raises(DataError, match=r"nothere\.jsonl: file not found"):
        read_records(tmp_path / "nothere.jsonl", TrainingExample)


@pytest.mark.parametrize("bad, field", [
    ({"id": "x", "prompt": "p", "source_stage": "s"}, "response"),                       # missing
    ({"id": "x", "prompt": "p", "response": "r", "source_stage": "s", "extra": 1}, "extra"),  # unknown
    ({"id": "x", "prompt": "p", "response": ["r"], "source_stage": "s"}, "response"),    # wrong type
])
def test_schema_failure_names_file_line_and_field(tmp_path, bad, field):
    """The file's line, blank lines counted (what an editor jumps to), the same numbering as a JSON error."""
    path = tmp_path / "train.jsonl"
    path.write_text(RECORDS[0].model_dump_json() + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"train\.jsonl: line 3: field '{field}'"):
        read_records(path, TrainingExample)


def test_iter_jsonl_numbers_file_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n', encoding="utf-8")
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": 2}]


# ------------------------------------------------------------------------------------------ hashes
def test_sha256_file_hashes_the_bytes_across_chunks(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 41 + b"tail"  # not a multiple of the chunk size
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected
    assert sha256_file(path, chunk=1000) == expected
    assert sha256_text("héllo") == hashlib.sha256("héllo".encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------ atomic writes
def test_atomic_write_replaces_whole_files_with_shared_permissions(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "good\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "half written \ud800")  # a lone surrogate cannot be encoded mid-write
    assert path.read_text() == "good\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


# ------------------------------------------------------------------------------------------ resumable
def test_resumable_writer_skips_done_ids_and_drops_a_torn_tail(tmp_path):
    partial, final = tmp_path / "raw.partial.jsonl", tmp_path / "raw.jsonl"
    with ResumableWriter(partial) as w:
        assert w.write_batch([{"id": "a", "v": 1}, {"id": "b", "v": 2}]) == 2
    with open(partial, "a", encoding="utf-8") as f:
        f.write('{"id": "c", "v"')  # killed mid-line
    w = ResumableWriter(partial)
    assert w.done_ids == {"a", "b"}
    assert partial.read_text().count("\n") == 2 and "c" not in partial.read_text()  # truncated to whole records
    assert w.write_batch([{"id": "b", "v": 99}, {"id": "c", "v": 3}]) == 1  # b is done: not duplicated
    recs = w.finalize(final, order=["c", "a", "b", "zz"])
    assert [(r["id"], r["v"]) for r in recs] == [("c", 3), ("a", 1), ("b", 2)]
    assert list(read_jsonl(final)) == recs and not partial.exists()
