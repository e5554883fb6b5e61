"""Prompt rendering from the human annotation in ``principles/`` (one function per prompt).

Step 2 (``self_align``) and the ``prompted`` evaluation variant both put the *self-align preamble* in
front of a query: the persona, the active principles (numbered), and the exemplar dialogues whose
internal thoughts cite principles by name. The preamble is rendered by :func:`render_preamble` only,
so the text a model saw can be written out (``data/self_align/prompt.txt``) and hashed onto every
record.

Why thoughts are rendered rather than written out in ``exemplars.yaml``: an ablation that excludes a
principle must also remove it from every exemplar thought (and renumber the rest), otherwise the
exemplars keep teaching the excluded rule. Keeping ``analysis`` + ``cites`` as data makes that exact.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from selfalign.config import ConfigError, SelfAlignConfig, project_config
from selfalign.io import DataError, sha256_text

__all__ = [
    "Exemplar",
    "PreambleTemplate",
    "Principle",
    "active_principles",
    "load_exemplars",
    "load_identity",
    "load_principles",
    "load_template",
    "parse_cited",
    "principle_set_sha256",
    "prompted_request",
    "query_text",
    "render_preamble",
    "render_thought",
    "split_completion",
]

log = logging.getLogger(__name__)
_REPO_ROOT = Path(__file__).resolve().parents[2]
A = TypeVar("A", bound=BaseModel)


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


# ------------------------------------------------------------------------------------------ loading
def _load_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise DataError(f"{path}: {where}invalid YAML: {getattr(exc, 'problem', exc)}") from None


def _validate(path: str | Path, what: str, obj: Any, model: type[A]) -> A:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "<item>"
        raise DataError(f"{path}: {what}: field '{field}': {err['msg']}") from None


def _load_list(path: str | Path, model: type[A]) -> list[A]:
    data = _load_yaml(path)
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
    data = _load_yaml(path)
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


# ---------------------------------------------------------------------------------------- rendering
def active_principles(principles: Sequence[Principle], exclude: Sequence[str] = ()) -> list[Principle]:
    """Principles minus ``exclude`` (by name), renumbered 1..n so the preamble has no gaps."""
    names = {p.name for p in principles}
    unknown = sorted(set(exclude) - names)
    if unknown:
        raise ConfigError(f"self_align.exclude: unknown principle name(s) {unknown}; known: {sorted(names)}")
    kept = [p for p in principles if p.name not in set(exclude)]
    return [p.model_copy(update={"id": i}) for i, p in enumerate(kept, 1)]


def principle_set_sha256(active: Sequence[Principle]) -> str:
    """Identity of the active rule set (names + texts in order); numbering follows from the order."""
    return sha256_text(json.dumps([[p.name, p.text] for p in active], ensure_ascii=False))


def render_thought(template: PreambleTemplate, analysis: str, cited: Sequence[Principle]) -> str:
    """``<self_id> <analysis> <cite_intro> 3 (helpful), 7 (candor).`` — the format the parser expects."""
    rules = ", ".join(f"{p.id} ({p.name})" for p in cited)
    return f"{template.self_id} {analysis} {template.cite_intro} {rules}."


def _render_exemplar(template: PreambleTemplate, ex: Exemplar, by_name: dict[str, Principle]) -> str | None:
    cited = [by_name[name] for name in ex.cites if name in by_name]
    if not cited:
        return None  # every rule it illustrates was excluded: the dialogue would teach nothing true
    thought = render_thought(template, ex.analysis, cited)
    return (
        f"{template.user_tag} {ex.query.strip()}\n\n"
        f"{template.thought_tag} {thought}\n\n"
        f"{template.answer_tag} {ex.answer.strip()}"
    )


def _default_template() -> PreambleTemplate:
    """The template and persona the repository's ``params.yaml`` names (its files under ``principles/``)."""
    return load_from_config(project_config().self_align, _REPO_ROOT)[2]


def render_preamble(
    principles: Sequence[Principle],
    exemplars: Sequence[Exemplar],
    exclude: Sequence[str] = (),
    template: PreambleTemplate | None = None,
) -> str:
    """The self-align prefix: header, numbered active principles, exemplars; ends with the user tag.

    Excluded principles disappear from the list and from every exemplar thought; an exemplar left
    citing nothing is dropped. ``template=None`` uses the repository's default template and persona.
    """
    template = template or _default_template()
    active = active_principles(principles, exclude)
    by_name = {p.name: p for p in active}
    all_names = {p.name for p in principles}
    for ex in exemplars:
        stray = [c for c in ex.cites if c not in all_names]
        if stray:
            log.warning("exemplar %s cites principles not in the principle file: %s", ex.id, stray)
    rendered = [r for ex in exemplars if (r := _render_exemplar(template, ex, by_name)) is not None]
    rules = "\n".join(f"{p.id} ({p.name}). {p.text.strip()}" for p in active)
    body = template.header.format(persona=template.persona, principles=rules, exemplars="\n\n".join(rendered))
    return f"{body.rstrip()}\n\n{template.user_tag}"


def query_text(template: PreambleTemplate, query: str, input: str = "", *, thought: bool = True) -> str:
    """The per-query suffix after the preamble: the user turn, then the tag the model continues from.

    ``thought=True`` ends with the internal-thoughts tag (how step 2 generates); ``thought=False``
    ends with the answer tag, for scoring answers directly.
    """
    user = query.strip() + (f"\n\n{input.strip()}" if input.strip() else "")
    tag = template.thought_tag if thought else template.answer_tag
    return f" {user}\n\n{tag}"


def prompted_request(
    cfg: SelfAlignConfig, query: str, input: str = "", *, thought: bool = True, root: str | Path = "."
) -> tuple[str, str]:
    """``(prefix, text)`` of the in-context-aligned ``prompted`` variant (same preamble as step 2).

    Pass the result as a generation Request; :func:`split_completion` recovers the answer.
    """
    principles, exemplars, template = load_from_config(cfg, root)
    prefix = render_preamble(principles, exemplars, cfg.exclude, template)
    return prefix, query_text(template, query, input, thought=thought)


# ------------------------------------------------------------------------------------------ parsing
def split_completion(template: PreambleTemplate, completion: str) -> tuple[str, str] | None:
    """``(thought, answer)`` of a completion that began after the thought tag; None without an answer tag.

    The answer tag must start a line (the thought itself may mention the name).
    """
    match = re.search(r"\n[ \t]*" + re.escape(template.answer_tag), completion)
    if match is None:
        return None
    return completion[: match.start()].strip(), completion[match.end():].strip()


def parse_cited(thought: str, names: Sequence[str]) -> list[str]:
    """Principle names cited as ``N (name)`` in a thought, in order, deduplicated, known names only."""
    known = set(names)
    found = [m.group(1) for m in re.finditer(r"\(\s*([A-Za-z][\w-]*)\s*\)", thought)]
    return list(dict.fromkeys(n.lower() for n in found if n.lower() in known))


# --- training template (steps 3-4: engrave, verbose_clone; also evaluation and serve) -------------
# The engraved and verbose models see exactly `training_prompt(...)` before their answer: the short
# system prompt (principles/assistant.md, no principles, no exemplars -- their absence is the
# "engraving") rendered with the tokenizer's own chat template. Base models without a chat template
# fall back to a plain "### User / ### Assistant" layout (the paper's, with our persona's header).
#
# END_OF_ANSWER convention: the answer is followed by the template's own end-of-turn marker and that
# marker is trained (it is part of the loss). For ChatML (SmolLM2, Qwen ...) that is "<|im_end|>",
# which is also the tokenizer's eos, so every engine stops on it without a stop string. Unlike the
# paper we do not teach "### User" as the end of an answer: a real end-of-turn token cannot be
# confused with text, and the Dromedary card itself advises swapping in your own end token. For the
# plain template the marker is the tokenizer's eos token. `end_of_answer(tokenizer, template)`
# resolves it; engines should stop on it (pass it as a stop string if it is not the eos).

END_OF_ANSWER = "<|im_end|>"
PLAIN_USER_HEADER = "### User"
PLAIN_ASSISTANT_HEADER = "### Assistant"


def load_system_prompt(path: str | Path | None) -> str | None:
    """The system prompt text (stripped), or ``None`` when no file is configured."""
    if path is None:
        return None
    return Path(path).read_text(encoding="utf-8").strip()


def user_turn(query: str, input: str = "") -> str:
    """The user message: the instruction, then (if any) a blank line and its input."""
    query, input = query.strip(), input.strip()
    return f"{query}\n\n{input}" if input else query


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def training_prompt(tokenizer, query: str, input: str = "", system: str | None = None,
                    template: str = "chat") -> str:
    """The exact text an engraved/verbose model sees before its answer.

    ``template="chat"`` uses the tokenizer's chat template with ``system`` as the system message
    (text from :func:`load_system_prompt`). ``None`` sends no system message, which leaves the
    template's default -- for SmolLM2 *its own* persona -- so pipeline callers always pass ours
    (:func:`assistant_prompt` does). ``"plain"``, or a
    tokenizer without a chat template, gives ``system``, a blank line, ``### User``, the message, a
    blank line and ``### Assistant``."""
    content = user_turn(query, input)
    if template == "chat" and has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"{system}\n\n" if system else ""
    return f"{head}{PLAIN_USER_HEADER}\n{content}\n\n{PLAIN_ASSISTANT_HEADER}\n"


def end_of_answer(tokenizer, template: str = "chat") -> str:
    """The marker appended to (and trained after) every answer; see END_OF_ANSWER above.

    For chat templates it is read off the template itself: what it writes right after an assistant
    message, up to the first newline (ChatML: ``<|im_end|>``)."""
    if template == "chat" and has_chat_template(tokenizer):
        probe = "\x00answer\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}], tokenize=False)
        tail = text.split(probe, 1)[1].strip("\n").split("\n", 1)[0].strip()
        if tail:
            return tail
    return tokenizer.eos_token or ""


def split_shared_prefix(prompt: str, query: str, input: str = "") -> tuple[str, str]:
    """(prefix, text) of a :func:`training_prompt` for an engine Request: the prefix (system prompt
    and template up to the user's message) is identical for every query, so engines cache it."""
    cut = prompt.rindex(user_turn(query, input))
    return prompt[:cut], prompt[cut:]


def assistant_prompt(config, tokenizer, query: str, input: str = "") -> str:
    """:func:`training_prompt` with the template and system prompt named in ``config.engrave``:
    what evaluation and ``serve`` put in front of a query for the engraved and verbose models."""
    system = load_system_prompt(config.engrave.system_prompt_file)
    return training_prompt(tokenizer, query, input, system=system, template=config.engrave.template)


def load_identity(path: str | Path) -> list["TrainingExample"]:
    """Identity Q/A pairs (``[{q, a}]``, human-written) as training examples with stable ids.

    Lives here with the other annotation loaders: steps 2 and 4 both append them to their training data.
    """
    from selfalign.schemas import TrainingExample

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if Path(path).exists() else None
    if not isinstance(data, list) or not all(isinstance(d, dict) and {"q", "a"} <= set(d) for d in data):
        raise DataError(f"{path}: expected a YAML list of {{q, a}} mappings")
    return [
        TrainingExample(id=f"identity-{i:03d}", prompt=str(d["q"]).strip(), response=str(d["a"]).strip(),
                        source_stage="identity")
        for i, d in enumerate(data, 1)
    ]
