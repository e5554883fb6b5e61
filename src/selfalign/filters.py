"""Filters as small named predicates: each returns a reject *reason* (str) or ``None`` to keep.

Stages apply a list of predicates in order, write every dropped record to their rejects file with its
reason, and count reasons in their metrics (:func:`apply_filters`). No exceptions as control flow.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Iterable, Protocol, TypeVar

from selfalign.ngrams import loops, word_ngrams

T = TypeVar("T")
Predicate = Callable[[T], "str | None"]


def apply_filters(item: T, predicates: Iterable[Predicate]) -> str | None:
    """First reject reason among ``predicates`` (in order), or ``None`` if every one keeps it."""
    for pred in predicates:
        reason = pred(item)
        if reason is not None:
            return reason
    return None


def count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    """Per-reason counts, most common first (for stage metrics)."""
    return dict(Counter(reasons).most_common())


# --- instruction filters (step 1, red_team) ------------------------------------------------------
# Predicates over an instruction-like record (anything with ``text`` and ``input`` attributes, e.g.
# schemas.Prompt). Factories take their knobs from params (red_team.*) so no bound lives in code.


class _HasInstruction(Protocol):
    text: str
    input: str


def instruction_length(min_words: int, max_words: int) -> Predicate:
    """Keep instructions of more than ``min_words`` and at most ``max_words`` whitespace words.

    Very short lines are usually list debris ("Write a poem."), very long ones run-on generations."""

    def check(item: _HasInstruction) -> str | None:
        n = len(item.text.split())
        if n <= min_words:
            return "too_short"
        if n > max_words:
            return "too_long"
        return None

    return check


def no_blacklisted_words(words: Iterable[str]) -> Predicate:
    """Reject when the instruction *or* its input names a blacklisted word or phrase (whole words,
    any case): tasks about images, files, audio ... that a text-only model cannot do."""
    phrases = [w.strip() for w in words if w.strip()]
    if not phrases:
        return lambda item: None
    pattern = re.compile(
        r"\b(?:" + "|".join(r"\s+".join(map(re.escape, p.split())) for p in phrases) + r")\b",
        re.IGNORECASE,
    )

    def check(item: _HasInstruction) -> str | None:
        return "blacklist" if pattern.search(item.text) or pattern.search(item.input) else None

    return check


def starts_cleanly(item: _HasInstruction) -> str | None:
    """Reject instructions that start with punctuation or a non-ASCII character (parse debris,
    other languages) or are empty."""
    text = item.text.lstrip()
    if not text:
        return "empty"
    first = text[0]
    if not first.isascii() or first in string.punctuation:
        return "bad_start"
    return None


def topic_filters(max_words: int, type_name: str | None = None) -> list[Predicate]:
    """Predicates over a brainstormed topic string: short, capitalised noun phrase without
    trailing punctuation (a sentence or a question is not a topic), no comma list, no repeated word
    (a small model loops: "Sports, Sports, Sports", "Electronics and Electronics") and, when
    ``type_name`` is given, not just the type's own name ("Art" for type ``art`` adds no topic)."""

    def empty(topic: str) -> str | None:
        return "topic_empty" if not topic.strip() else None

    def too_long(topic: str) -> str | None:
        return "topic_too_long" if len(topic.split()) > max_words else None

    def not_capitalised(topic: str) -> str | None:
        # the first word that starts with a letter counts, so "18th Century Art" is capitalised
        word = next((w for w in topic.split() if w[:1].isalpha()), "")
        return None if word[:1].isascii() and word[:1].isupper() else "topic_not_capitalised"

    def trailing_punct(topic: str) -> str | None:
        return "topic_punctuation" if topic.rstrip()[-1:] in set(string.punctuation) else None

    def comma_list(topic: str) -> str | None:
        return "topic_list" if re.search(r"[,;/]", topic) else None

    def repeated_word(topic: str) -> str | None:
        words = [w for w in re.findall(r"[a-z0-9]+", topic.lower()) if len(w) > 3]
        return "topic_repeated_word" if len(words) != len(set(words)) else None

    type_key = " ".join(re.findall(r"[a-z0-9]+", (type_name or "").lower()))

    def is_type_name(topic: str) -> str | None:
        key = " ".join(re.findall(r"[a-z0-9]+", topic.lower()))
        return "topic_is_type" if type_key and key == type_key else None

    return [empty, comma_list, repeated_word, too_long, not_capitalised, trailing_punct, is_type_name]


# --- response filters (step 2 self_align, step 4 verbose_clone) ----------------------------------
# Text surgery shared by every stage that cleans a model's answer (self_align, verbose_clone), then
# predicates over the cleaned :class:`Answer`. Knobs come from params; defaults here only document.


class Answer:
    """A cleaned answer. ``complete``: it ended at a turn end / EOS, not at the token limit or in a
    loop; ``repeated``: a repetition cut shortened it.

    Only complete answers should teach the model to stop (the trainer appends its end marker to
    those). Complete and repetition-cut answers are held to a minimum length; an answer truncated by
    the token limit is not (it is short by accident, not by choice)."""

    __slots__ = ("text", "complete", "repeated")

    def __init__(self, text: str, complete: bool, repeated: bool = False):
        self.text = text
        self.complete = complete
        self.repeated = repeated

    def __repr__(self) -> str:
        return f"Answer(text={self.text!r}, complete={self.complete}, repeated={self.repeated})"


def cut_turn_end(text: str, markers: Iterable[str]) -> tuple[str, bool]:
    """Text before the earliest turn-end marker (e.g. ``"\\nUser:"``), and whether one was found.

    A base model keeps writing the next dialogue turn after its answer; that turn is not the answer."""
    cuts = [i for m in markers if m and (i := text.find(m)) >= 0]
    if not cuts:
        return text, False
    return text[: min(cuts)].rstrip(), True


_CHUNK = re.compile(r"[^\n.?!;:,`]*[\n.?!;:,`]|[^\n.?!;:,`]+$")


def repetition_cut(text: str, min_chunk_chars: int = 10) -> str:
    """Cut ``text`` before the first chunk that repeats an earlier one (a degenerate loop).

    Chunks end after each newline . ? ! ; : , or backtick and are compared without that delimiter
    ("I go," repeats as "I go."); a chunk shorter than ``min_chunk_chars`` ("1.", "}", "Yes,") may
    repeat without ending the answer."""
    seen: set[str] = set()
    pos = 0
    for match in _CHUNK.finditer(text):
        key = match.group().strip().rstrip("\n.?!;:,`").strip()
        if len(key) >= max(min_chunk_chars, 1):
            if key in seen:
                return text[:pos].rstrip()
            seen.add(key)
        pos = match.end()
    return text


def drop_partial_word(text: str) -> str:
    """Drop the last whitespace-delimited word: a generation cut by the token limit ends mid-word."""
    text = text.rstrip()
    cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
    return text[:cut].rstrip() if cut >= 0 else ""


def clean_answer(text: str, ended: bool, markers: Iterable[str], min_chunk_chars: int = 10) -> Answer:
    """Turn-end cut, repetition cut, and (for truncated answers only) the partial last word.

    ``ended`` says the engine stopped on EOS or a stop string (``finish == "stop"``); a turn-end
    marker found in the text also counts as a natural end. A repetition cut already ends on a chunk
    boundary, so no word is dropped after it, but the answer does not count as complete."""
    body, found = cut_turn_end(text, markers)
    complete = ended or found
    cut = repetition_cut(body, min_chunk_chars)
    if cut != body:
        return Answer(cut.strip(), False, repeated=True)
    if not complete:
        body = drop_partial_word(body)
    return Answer(body.strip(), complete)


def empty_answer(answer: Answer) -> str | None:
    return "empty" if not answer.text.strip() else None


def min_answer_chars(n: int) -> Predicate:
    """Complete or repetition-cut answers shorter than ``n`` characters are dropped (paper: 160 for
    complete ones); answers truncated by the token limit are kept whatever their length."""

    def check(answer: Answer) -> str | None:
        return "too_short" if (answer.complete or answer.repeated) and len(answer.text) < n else None

    return check


def contains_any(phrases: Iterable[str], reason: str) -> Predicate:
    """Reject answers containing any phrase (case-insensitive substring), e.g. copied exemplar
    content or dialogue tags that leaked into the answer."""
    needles = [p.lower() for p in phrases if p]

    def check(answer: Answer) -> str | None:
        low = answer.text.lower()
        return reason if any(n in low for n in needles) else None

    return check


def leaks_exemplar(phrases: Iterable[str], prompt: str) -> Predicate:
    """Reject answers that copy an exemplar's *content* (its names, facts, numbers: ``Ailuridae``,
    ``UTC+9``) the user never mentioned.

    Why "the user never mentioned": a question about Tokyo may name Tokyo. And why content only: the
    principles' natural wording ("I cannot know the current time") is what the exemplars are there to
    teach; dropping answers that generalise it throws away exactly the behaviour to engrave."""
    asked = prompt.lower()
    needles = [p.lower() for p in phrases if p and p.lower() not in asked]

    def check(answer: Answer) -> str | None:
        low = answer.text.lower()
        return "leak_exemplar" if any(n in low for n in needles) else None

    return check


def echoes_thought(thought: str, threshold: float, openers: Iterable[str] = ()) -> Predicate:
    """Reject answers that repeat the internal thought instead of answering: ROUGE-L F to the thought
    at or above ``threshold``, or an opening in the thought's third-person voice ("The user asks...")."""
    from selfalign.dedup import rouge_l_f

    heads = tuple(o.lower() for o in openers if o)

    def check(answer: Answer) -> str | None:
        text = answer.text.strip()
        if heads and text.lower().startswith(heads):
            return "thought_in_answer"
        return "thought_in_answer" if thought.strip() and rouge_l_f(text, thought) >= threshold else None

    return check


def shows_behaviour(patterns: Iterable[str], text: str) -> bool:
    """Does ``text`` match any of the (case-insensitive) behaviour patterns?"""
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def unjustified_behaviour(checks: dict[str, tuple[str, ...]], cited: Iterable[str]) -> Predicate:
    """Reject an answer that shows a principled behaviour (refusing, "I have no live data", naming a
    cut-off ...) whose principle its own thought did not cite: reason ``unjustified_<principle>``.

    Why: the teacher refuses or disclaims without discrimination (~43% of unsafe *and* of safe-but-edgy
    requests in context). Keeping a refusal only when the thought judged the request to need it is how
    the kept data teaches the principle rather than the reflex."""
    cited = set(cited)

    def check(answer: Answer) -> str | None:
        for name, patterns in checks.items():
            if name not in cited and shows_behaviour(patterns, answer.text):
                return f"unjustified_{name}"
        return None

    return check


def unjudged_refusal(refusal: Iterable[str], judgement: Iterable[str], thought: str) -> Predicate:
    """Reject a refusal (an answer matching ``refusal``) whose thought names no harm (no ``judgement``
    pattern): reason ``unjudged_refusal``.

    Why: citing the refusal principle is a reflex a small model copies from the exemplar; naming what makes
    the request harmful ("..., which is dangerous and illegal") is the judgement the refusal must rest on."""
    refusal = tuple(refusal)
    judged = shows_behaviour(judgement, thought)

    def check(answer: Answer) -> str | None:
        return "unjudged_refusal" if not judged and shows_behaviour(refusal, answer.text) else None

    return check


def refusal_of_benign(refusal: Iterable[str], harmful_prompt: bool) -> Predicate:
    """Reject a refusal (an answer matching ``refusal``) of a prompt not known to be harmful: reason
    ``refusal_benign``. Whatever the thought says, refusing a benign request teaches over-refusal."""
    refusal = tuple(refusal)

    def check(answer: Answer) -> str | None:
        return "refusal_benign" if not harmful_prompt and shows_behaviour(refusal, answer.text) else None

    return check


def complies_with_harm(refusal: Iterable[str], harmful_prompt: bool) -> Predicate:
    """Reject an answer to a prompt that may be refused (a harmful red-team type) that does *not* refuse:
    reason ``harmful_compliance``.

    Why: a teacher that helps with a harmful request (at 135M: "The pipe bomb ... can be made with any
    material") hands that help to the student, which then refuses harmful requests less than the base model
    did. The paper needs no such filter because its 65B teacher refused by itself; a weak teacher's
    compliance is the one answer to such a prompt that must never be engraved."""
    refusal = tuple(refusal)

    def check(answer: Answer) -> str | None:
        return "harmful_compliance" if harmful_prompt and not shows_behaviour(refusal, answer.text) else None

    return check


def min_answer_chars_unless_principled(n: int, brief_n: int, checks: dict[str, tuple[str, ...]],
                                       cited: Iterable[str]) -> Predicate:
    """:func:`min_answer_chars`, except that a brief answer which visibly follows a principle its thought
    cited (a refusal, a question back, "I cannot know that") only needs ``brief_n`` characters: a
    principled refusal is short by nature, and the paper's 160-character floor would drop all of them."""
    cited = set(cited)
    full = min_answer_chars(n)

    def check(answer: Answer) -> str | None:
        principled = any(name in cited and shows_behaviour(patterns, answer.text) for name, patterns in checks.items())
        if principled:
            return "too_short" if (answer.complete or answer.repeated) and len(answer.text) < brief_n else None
        return full(answer)

    return check


def opens_with_any(openers: Iterable[str], reason: str) -> Predicate:
    """Reject answers whose first words are one of ``openers`` (case-insensitive), e.g. apologies."""
    heads = tuple(o.lower() for o in openers if o)

    def check(answer: Answer) -> str | None:
        return reason if heads and answer.text.lstrip().lower().startswith(heads) else None

    return check


# verbose cloning (step 4) ---------------------------------------------------------------------------
def cap_numbered_list(text: str, max_items: int) -> str:
    """Cut a numbered list after item ``max_items`` (paper: 12): at the first line starting with
    ``max_items + 1.``. Long generated lists are where a small model starts looping."""
    match = re.search(rf"\n[ \t]*{max_items + 1}\.[ \t]", text)
    return text[: match.start()].rstrip() if match else text


def short_unfinished(n: int) -> Predicate:
    """Drop answers cut by the token limit (no end of turn) that are shorter than ``n`` characters
    (paper: 128): a truncated *and* short answer is mostly preamble or a stalled loop."""

    def check(answer: Answer) -> str | None:
        return "short_unfinished" if not answer.complete and len(answer.text) < n else None

    return check


def copies_source(source: str, n_words: int, reason: str = "copied_prompt") -> Predicate:
    """Reject answers sharing a run of ``n_words`` consecutive words (case and punctuation ignored)
    with ``source`` -- e.g. a teacher prompt recited instead of followed."""
    return copies_any((source,), n_words, reason)


def copies_any(sources: Iterable[str], n_words: int, reason: str) -> Predicate:
    """Reject answers sharing a run of ``n_words`` consecutive words with any of ``sources``."""
    grams: set[tuple[str, ...]] = set().union(*(word_ngrams(s, n_words) for s in sources))

    def check(answer: Answer) -> str | None:
        return reason if grams and not grams.isdisjoint(word_ngrams(answer.text, n_words)) else None

    return check


def repeats_chunk(ngram_words: int, min_count: int, reason: str = "loop") -> Predicate:
    """Reject an answer that loops (:func:`selfalign.ngrams.loops`, the do-no-harm check's definition).

    Why: a student fine-tuned on looping answers loops more in its own greedy replies (issue 20: the
    engraved model looped in 16.8% of replies against the control's 10.5% after training on answers like
    "It is a very large machine, which is a very large machine"). The teacher's loops must not be engraved."""

    def check(answer: Answer) -> str | None:
        return reason if loops(answer.text, ngram_words, min_count) else None

    return check
