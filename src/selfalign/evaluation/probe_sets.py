"""Principle probe sets (``eval/probes/<set>.yaml``): the dataclasses, the loader and its validation.

A leaf module on purpose: step 1's contamination guard reads every probe prompt (no generated training
prompt may resemble one) without importing the scoring, generation and judging code of
:mod:`selfalign.evaluation.probes`, so a change there does not re-run step 1.

Each file names its principle (= the file stem), the behaviour, a pattern rule that recognises it
(``expect: present``) or its failure (``expect: absent``), and at least :data:`MIN_PROBES` probes, each a
prompt with a reply that ``follows`` the principle and one that ``breaks`` it. The loader rejects a file
whose reference replies its own rule misjudges; every error names the file and the line of the probe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from selfalign.io import DataError, parse_yaml

__all__ = ["MIN_PROBES", "Probe", "ProbeSet", "load_probe_set", "load_probe_sets", "matches"]

_SET_KEYS = {"principle", "behaviour", "patterns", "expect", "probes"}
_PROBE_KEYS = {"id", "prompt", "follows", "breaks", "patterns"}
MIN_PROBES = 12


@dataclass(frozen=True)
class Probe:
    id: str
    prompt: str
    follows: str
    breaks: str
    patterns: tuple[re.Pattern, ...]  # effective rule (the probe's own patterns, else its set's)
    line: int  # 1-based line of the probe in its file, for error messages


@dataclass(frozen=True)
class ProbeSet:
    name: str  # the principle name, "identity" or "over-refusal" (= the file stem)
    behaviour: str
    expect: Literal["present", "absent"]
    probes: tuple[Probe, ...]
    path: str


# ------------------------------------------------------------------------------------------ loading
def _compile(patterns: Any, where: str) -> tuple[re.Pattern, ...]:
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise DataError(f"{where}: `patterns` must be a non-empty list of regex strings")
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p, re.IGNORECASE))
        except re.error as exc:
            raise DataError(f"{where}: bad regex {p!r}: {exc}") from None
    return tuple(out)


def _item_lines(text: str) -> list[int]:
    """1-based line of each item of the top-level ``probes`` sequence (PyYAML's node marks)."""
    root = yaml.compose(text)
    for key, value in getattr(root, "value", []):
        if getattr(key, "value", None) == "probes" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def matches(patterns: Sequence[re.Pattern], text: str) -> bool:
    """Does any of the rule's patterns occur in ``text``? (the rule judges replies with this too)"""
    return any(p.search(text) for p in patterns)


def _probe(raw: Any, where: str, set_patterns: tuple[re.Pattern, ...], expect: str, line: int) -> Probe:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a probe must be a mapping with id, prompt, follows, breaks")
    unknown = set(raw) - _PROBE_KEYS
    if unknown:
        raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; allowed {sorted(_PROBE_KEYS)}")
    for key in ("id", "prompt", "follows", "breaks"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise DataError(f"{where}: `{key}` must be a non-empty string")
    patterns = _compile(raw["patterns"], where) if "patterns" in raw else set_patterns
    probe = Probe(raw["id"], raw["prompt"].strip(), raw["follows"].strip(), raw["breaks"].strip(), patterns, line)
    # the rule and the reference replies must agree, or the two scores measure different things
    shows_f, shows_b = matches(patterns, probe.follows), matches(patterns, probe.breaks)
    if expect == "present" and not (shows_f and not shows_b):
        raise DataError(f"{where}: with expect: present, `follows` must match the patterns and `breaks` must not "
                        f"(follows matches: {shows_f}, breaks matches: {shows_b})")
    if expect == "absent" and not (shows_b and not shows_f):
        raise DataError(f"{where}: with expect: absent, `breaks` must match the patterns and `follows` must not "
                        f"(follows matches: {shows_f}, breaks matches: {shows_b})")
    return probe


def load_probe_set(path: str | Path, min_probes: int = MIN_PROBES) -> ProbeSet:
    """Load and validate one probe file; every error names the file and the line of the bad probe."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    data = parse_yaml(text, path)
    lines = _item_lines(text)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping with keys {sorted(_SET_KEYS)}")
    missing, unknown = _SET_KEYS - set(data), set(data) - _SET_KEYS
    if missing or unknown:
        raise DataError(f"{path}: missing key(s) {sorted(missing)}, unknown key(s) {sorted(unknown)}")
    if data["principle"] != path.stem:
        raise DataError(f"{path}: `principle` is {data['principle']!r} but the file is named {path.stem!r}")
    if data["expect"] not in ("present", "absent"):
        raise DataError(f"{path}: `expect` must be 'present' or 'absent', got {data['expect']!r}")
    if not isinstance(data["behaviour"], str) or not data["behaviour"].strip():
        raise DataError(f"{path}: `behaviour` must be a non-empty string")
    set_patterns = _compile(data["patterns"], str(path))
    raw_probes = data["probes"]
    if not isinstance(raw_probes, list) or len(raw_probes) < min_probes:
        n = len(raw_probes) if isinstance(raw_probes, list) else 0
        raise DataError(f"{path}: `probes` must list at least {min_probes} probes, found {n}")
    probes, seen = [], set()
    for k, raw in enumerate(raw_probes):
        line = lines[k] if k < len(lines) else 0
        probe = _probe(raw, f"{path}:{line}", set_patterns, data["expect"], line)
        if probe.id in seen:
            raise DataError(f"{path}:{line}: duplicate probe id {probe.id!r}")
        seen.add(probe.id)
        probes.append(probe)
    return ProbeSet(path.stem, data["behaviour"].strip(), data["expect"], tuple(probes), str(path))


def load_probe_sets(probe_dir: str | Path, principle_names: Sequence[str] = (),
                    min_probes: int = MIN_PROBES) -> list[ProbeSet]:
    """Every ``<set>.yaml`` under ``probe_dir``, sorted by name; probe ids must be unique across sets.

    ``principle_names``, when given, are the names a set may be called besides identity/over-refusal:
    a probe file for a principle that does not exist is a typo, not a new kind of probe."""
    probe_dir = Path(probe_dir)
    paths = sorted(probe_dir.glob("*.yaml"))
    if not paths:
        raise DataError(f"{probe_dir}: no probe files (*.yaml)")
    sets = [load_probe_set(p, min_probes) for p in paths]
    allowed = set(principle_names) | {"identity", "over-refusal"}
    owner: dict[str, str] = {}
    for s in sets:
        if principle_names and s.name not in allowed:
            raise DataError(f"{s.path}: {s.name!r} is not a principle name, 'identity' or 'over-refusal'")
        for p in s.probes:
            if p.id in owner:
                raise DataError(f"{s.path}:{p.line}: probe id {p.id!r} also used in {owner[p.id]}")
            owner[p.id] = s.path
    return sets
