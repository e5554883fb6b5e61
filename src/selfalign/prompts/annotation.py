"""Loaders of the human annotation under ``principles/``: every file is validated here, once.

Step 1 reads the seed tasks, the red-team types and its three raw-completion templates; step 2 and the
``prompted`` evaluation variant read the principles, exemplars, turn template and persona; steps 2 and
4 append the identity answers to their training data. Each loader fails with a :class:`DataError` that
names the file and the item (or line) at fault, before any model is loaded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from selfalign.config import SelfAlignConfig
from selfalign.io import DataError, iter_jsonl, load_yaml

if TYPE_CHECKING:
    from selfalign.schemas import TrainingExample

__all__ = [
    "Exemplar",
    "PreambleTemplate",
    "Principle",
    "RedTeamType",
    "SeedTask",
    "load_exemplars",
    "load_from_config",
    "load_identity",
    "load_principles",
    "load_seed_tasks",
    "load_template",
    "load_types",
    "read_template",
]

A = TypeVar("A", bound=BaseModel)


# --------------------------------------------------------------------------- step 2: the preamble
class _Annotation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Principle(_Annotation):
    """One rule of the preamble; ``name`` is the ablation key, ``id`` its number once rendered."""

    id: int
    name: str
    text: str


class Exemplar(_Annotation):
    """One in-context dialogue. The thought is rendered from ``analysis`` + ``cites`` (principle names)."""

    id: str
    query: str
    analysis: str
    cites: tuple[str, ...]
    leaks: tuple[str, ...] = ()
    answer: str


class PreambleTemplate(_Annotation):
    """Header text and turn format (``principles/templates/self_align.yaml``) plus the persona."""

    header: str
    user_tag: str
    thought_tag: str
    answer_tag: str
    self_id: str
    cite_intro: str
    persona: str = ""


def _validate(path: str | Path, what: str, obj: Any, model: type[A]) -> A:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "<item>"
        raise DataError(f"{path}: {what}: field '{field}': {err['msg']}") from None


def _load_list(path: str | Path, model: type[A]) -> list[A]:
    data = load_yaml(path)
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty YAML list")
    items = [_validate(path, f"item {i}", obj, model) for i, obj in enumerate(data, 1)]
    seen: set[str] = set()
    for item in items:
        key = str(getattr(item, "name", None) or getattr(item, "id"))
        if key in seen:
            raise DataError(f"{path}: duplicate entry '{key}'")
        seen.add(key)
    return items


def load_principles(path: str | Path) -> list[Principle]:
    """The principle list in file order (names must be unique: they are the ablation keys)."""
    return _load_list(path, Principle)


def load_exemplars(path: str | Path) -> list[Exemplar]:
    return _load_list(path, Exemplar)


def load_template(path: str | Path, persona_path: str | Path | None = None) -> PreambleTemplate:
    """Turn format + header; the persona (``assistant.md``) is substituted into the header."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a YAML mapping")
    if persona_path is not None:
        try:
            data["persona"] = Path(persona_path).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise DataError(f"{persona_path}: file not found") from None
    return _validate(path, "template", data, PreambleTemplate)


def _config_paths(cfg: SelfAlignConfig, root: str | Path) -> dict[str, Path]:
    root = Path(root)
    return {
        "principles": root / cfg.principles_file,
        "exemplars": root / cfg.exemplars_file,
        "template": root / cfg.template_file,
        "persona": root / cfg.persona_file,
    }


def load_from_config(
    cfg: SelfAlignConfig, root: str | Path = "."
) -> tuple[list[Principle], list[Exemplar], PreambleTemplate]:
    """Everything the preamble is made of, from the files named in the ``self_align`` section."""
    p = _config_paths(cfg, root)
    return load_principles(p["principles"]), load_exemplars(p["exemplars"]), load_template(p["template"], p["persona"])


def load_identity(path: str | Path) -> list["TrainingExample"]:
    """Identity Q/A pairs (``[{q, a}]``, human-written) as training examples with stable ids.

    Lives here with the other annotation loaders: steps 2 and 4 both append them to their training data.
    """
    from selfalign.schemas import TrainingExample

    data = load_yaml(path)
    if not isinstance(data, list) or not all(isinstance(d, dict) and {"q", "a"} <= set(d) for d in data):
        raise DataError(f"{path}: expected a YAML list of {{q, a}} mappings")
    return [
        TrainingExample(id=f"identity-{i:03d}", prompt=str(d["q"]).strip(), response=str(d["a"]).strip(),
                        source_stage="identity")
        for i, d in enumerate(data, 1)
    ]


# ---------------------------------------------------------------- step 1: seed tasks and red-team types
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
    for lineno, obj in iter_jsonl(path):
        if not str(obj.get("instruction", "")).strip() or not obj.get("id"):
            raise DataError(f"{path}: line {lineno}: needs 'id' and a non-empty 'instruction'")
        seeds.append(SeedTask(str(obj["id"]), obj["instruction"].strip(), str(obj.get("input", "")).strip()))
    dupes = [i for i, c in Counter(s.id for s in seeds).items() if c > 1]
    if dupes:
        raise DataError(f"{path}: duplicate ids {dupes[:5]}")
    return seeds


def load_types(path: str | Path) -> list[RedTeamType]:
    """The adversarial question types (a YAML list of {name, description, topic, question})."""
    data = load_yaml(path)
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


def read_template(path: str | Path) -> str:
    """A raw-completion template of step 1 (``principles/templates/*.txt``), verbatim."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: template not found") from None
