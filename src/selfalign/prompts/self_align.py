"""The self-align preamble (step 2 and the ``prompted`` variant) and the parsing of its completions.

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
from typing import Sequence

from selfalign.config import ConfigError, SelfAlignConfig, project_config
from selfalign.io import sha256_text
from selfalign.prompts.annotation import Exemplar, PreambleTemplate, Principle, load_from_config

__all__ = [
    "active_principles",
    "parse_cited",
    "principle_set_sha256",
    "prompted_request",
    "query_text",
    "render_preamble",
    "render_thought",
    "split_completion",
]

log = logging.getLogger(__name__)
_REPO_ROOT = Path(__file__).resolve().parents[3]


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
