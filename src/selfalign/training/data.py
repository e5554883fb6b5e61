"""What the SFT recipe trains on: the examples, the ``train.limit`` selection, and their tokens.

* **Loss only on answer tokens.** The prompt (system prompt + chat template + query) gets label -100;
  the answer and the end-of-answer marker (:func:`selfalign.prompts.training.end_of_answer`) are
  trained, so the model learns both what to say and when to stop. An answer cut by a token limit gets
  no marker (``complete=False``).
* **One encoding convention** (:func:`encode_sft`): training and the held-out NLL
  (:mod:`selfalign.training.heldout`) both go through it, so a held-out answer is scored on the very
  tokens it would have been trained on.
* **``train.limit`` never drops identity examples**: it is a seeded sample of the other examples
  (:func:`select_examples`); the identity answers, a handful the model must learn, always train.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------ examples
@dataclass(frozen=True)
class SFTExample:
    """One pair as the model sees it: the full prompt text (template applied) and the answer.

    ``complete=False`` marks an answer cut by a token limit: it gets no end-of-answer marker, so the
    model is never taught to stop mid-sentence."""

    id: str
    prompt_text: str
    answer: str
    complete: bool = True


@dataclass(frozen=True)
class SFTData:
    """What to train on, the end-of-answer marker, and provenance for the resolved config."""

    examples: Sequence[SFTExample]
    end_marker: str
    provenance: dict[str, Any] = field(default_factory=dict)
    # ids that ``train.limit`` never drops (the identity answers)
    always_train: frozenset[str] = frozenset()


def template_examples(tokenizer, examples: Sequence[Any], template: str,
                      system: str | None) -> list[SFTExample]:
    """Render ``schemas.TrainingExample`` records with :func:`selfalign.prompts.training.training_prompt`
    (``prompt`` already holds the instruction and its input)."""
    from selfalign.prompts.training import training_prompt

    return [SFTExample(ex.id, training_prompt(tokenizer, ex.prompt, system=system, template=template),
                       ex.response, getattr(ex, "complete", True)) for ex in examples]


def assistant_sft_data(config, tokenizer, examples: Sequence[Any], train_path: str | Path, *,
                       always_train: Collection[str] = (), **provenance: Any) -> SFTData:
    """SFT data in the assistant format both stages train (``engrave.template`` + the short system
    prompt ``engrave.system_prompt_file``), with provenance for the resolved config.

    ``always_train``: ids of examples ``train.limit`` must keep (the identity answers)."""
    from selfalign.io import sha256_file, sha256_text
    from selfalign.prompts.training import end_of_answer, load_system_prompt

    cfg = config.engrave
    system = load_system_prompt(cfg.system_prompt_file)
    return SFTData(
        examples=template_examples(tokenizer, examples, cfg.template, system),
        end_marker=end_of_answer(tokenizer, cfg.template),
        provenance={"train_file": str(train_path), "train_sha256": sha256_file(train_path),
                    "template": cfg.template, "system_prompt_file": cfg.system_prompt_file,
                    "system_prompt_sha256": sha256_text(system) if system else None, **provenance},
        always_train=frozenset(always_train),
    )


def select_examples(data: SFTData, limit: int | None, seed: int) -> list[SFTExample]:
    """The examples a run trains on: all when ``limit`` is None, else every ``always_train`` example
    plus a ``seed``-ed random sample of ``limit`` of the others, in file order.

    Why a sample and not the head of the file: the file ends with the identity answers and is ordered by
    source (self-instruct before red-team prompts), so a head would drop identity first and skew the mix.
    """
    from selfalign.config import ConfigError

    examples = list(data.examples)
    if limit is None:
        return examples
    if limit < 1:  # params validation rejects it; a config built in code must not turn 0 into "all"
        raise ConfigError(f"train.limit: expected a number >= 1 or null (= all), got {limit}")
    others = [i for i, ex in enumerate(examples) if ex.id not in data.always_train]
    chosen = set(random.Random(seed).sample(others, limit)) if limit < len(others) else set(others)
    return [ex for i, ex in enumerate(examples) if ex.id in data.always_train or i in chosen]


# ------------------------------------------------------------------------------------------ encoding
@dataclass(frozen=True)
class Encoded:
    """One tokenised SFT example: ``labels`` is ``input_ids`` with -100 over the prompt."""

    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def n_answer(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def encode_example(tokenizer, example_id: str, prompt_text: str, answer: str, end_marker: str,
                   max_length: int) -> Encoded | None:
    """Tokenise prompt and answer *separately* (as an engine sees them: the prompt is encoded on its
    own, then the answer is generated token by token) and mask the prompt.

    The prompt gets the tokenizer's BOS exactly as the engines' prompts do
    (:func:`selfalign.generation.encoding.encode_text`: once, in front, never doubled by a chat template
    that writes it); the answer and its end marker (the eos for the plain template) get no special tokens.
    Right-truncates to ``max_length`` (the answer's tail goes first, as in the paper's ``cutoff_len``);
    returns ``None`` when the prompt alone leaves no room for any answer token."""
    from selfalign.generation.encoding import encode_text

    p = encode_text(tokenizer, prompt_text)
    a = tokenizer(answer + end_marker, add_special_tokens=False).input_ids
    if len(p) >= max_length or not a:
        return None
    ids = (p + a)[:max_length]
    labels = ([IGNORE_INDEX] * len(p) + a)[:max_length]
    return Encoded(id=example_id, input_ids=ids, labels=labels)


def encode_sft(tokenizer, examples: Sequence[SFTExample], data: SFTData,
               max_length: int) -> tuple[list[Encoded], int]:
    """Encode ``examples`` exactly as training sees them (end marker only on complete answers); returns
    the encoded examples and how many were dropped because the prompt alone reaches ``max_length``.

    The one encoding convention: training and the held-out NLL (:mod:`selfalign.training.heldout`) both
    go through it, so a held-out answer is scored on the very tokens it would have been trained on."""
    encoded, dropped = [], 0
    for ex in examples:
        marker = data.end_marker if ex.complete else ""
        enc = encode_example(tokenizer, ex.id, ex.prompt_text, ex.answer, marker, max_length)
        if enc is None:
            dropped += 1
        else:
            encoded.append(enc)
    return encoded, dropped
