"""Typed, frozen configuration built once from ``params.yaml``.

Every knob of the pipeline lives in ``params.yaml`` (one section per DVC stage, see DESIGN.md) and is
validated here *before* any compute starts. Validation errors are turned into one line that names the
file and the dotted key, e.g. ``params.yaml: self_align.temperature: expected a number >= 0, got "hot"``
(formatted by ``config_errors.py``; :class:`ConfigError` is re-exported here for callers).

Stages receive the whole :class:`Config` and read only their own section; DVC's ``params:`` lists in
``dvc.yaml`` declare which section each stage depends on, so editing one section re-runs only the stages
that read it.

The models here declare types and bounds only, never values: every field is required, so ``params.yaml``
is the one place a default lives (a second set of defaults in code drifted from it before: batch sizes,
hint counts and sampling differed between a config built in code and the pipeline's). Code that has no
params file of its own -- lm-eval's ``--model selfalign`` route, a library call, a test -- reads the
repository's file through :func:`project_config` / :func:`project_section`.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from selfalign.config_errors import ConfigError, format_error
from selfalign.io import load_yaml

__all__ = [
    "PROJECT_PARAMS",
    "Config",
    "ConfigError",
    "load_config",
    "parse_config",
    "project_config",
    "project_section",
    "record_reads",
]

# the repository's own params.yaml (src/selfalign/config.py -> repo root); the default for callers
# that are not given a params file
PROJECT_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


class _Section(BaseModel):
    """Base for every config section: immutable, unknown keys rejected (typos fail loudly)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


Prob = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]


# --------------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    """Where the base model comes from (``prepare_model``)."""

    source: str
    gguf_file: str | None
    gguf_sha256: str | None
    revision: str | None
    dtype: Literal["float32", "bfloat16", "float16"]
    trust_remote_code: bool


# ---------------------------------------------------------------------------------------- benchmarks
class HubDataset(_Section):
    """A HuggingFace Hub dataset pinned to a revision (used when no local mirror is configured)."""

    repo: str
    revision: str
    configs: tuple[str, ...]
    split: str


class BenchmarksConfig(_Section):
    """Where ``fetch_benchmarks`` finds TruthfulQA, HHH and Vicuna-80 and what it expects there."""

    dir_env: str
    use_hub: bool
    truthfulqa_hub: HubDataset
    hhh_hub: HubDataset
    vicuna_url: str
    expected_counts: dict[str, PosInt]
    sha256: dict[str, str]


# ---------------------------------------------------------------------------------------- generation
class OpenAIEngineConfig(_Section):
    base_url: str
    api_key_env: str
    model: str
    concurrency: PosInt
    max_retries: NonNegInt
    timeout_s: Annotated[float, Field(gt=0)]
    retry_backoff_s: Annotated[float, Field(gt=0)]


class VLLMEngineConfig(_Section):
    tensor_parallel_size: PosInt
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)]
    max_model_len: PosInt | None


class GenerationConfig(_Section):
    """The one generation layer every stage uses (engine choice, batching, context policy)."""

    engine: Literal["hf", "vllm", "openai"]
    batch_size: PosInt
    num_threads: PosInt | None
    max_context: PosInt | None
    min_new_tokens_reserved: NonNegInt
    overflow: Literal["drop_paragraphs", "truncate_left", "error"]
    prefix_cache_entries: PosInt
    score_token_budget: PosInt
    openai: OpenAIEngineConfig
    vllm: VLLMEngineConfig


# ------------------------------------------------------------------------------------------ red_team
class RedTeamConfig(_Section):
    """Step 1: vanilla self-instruct + topic-guided red-teaming self-instruct."""

    seed_tasks_file: str
    types_file: str
    seed: int
    # vanilla self-instruct
    self_instruct_requests: NonNegInt
    k_examples: PosInt
    temperature: NonNegFloat
    top_p: Prob
    max_new_tokens: PosInt
    min_words: NonNegInt
    max_words: PosInt
    blacklist: tuple[str, ...]
    rouge_threshold: Prob
    self_instruct_template: str
    no_input_marker: str
    ban_eos: bool
    # topic-guided red teaming
    topic_template: str
    question_template: str
    topic_rounds: NonNegInt
    topic_temperature: NonNegFloat
    topic_max_new_tokens: PosInt
    topics_shown: PosInt
    topic_prompts_per_type: PosInt | None
    max_topics_per_type: PosInt | None
    balance_topics: bool
    topic_max_words: PosInt
    topic_max_lines: PosInt
    topic_stop: tuple[str, ...]
    topic_ngram_penalties: tuple[float, ...]
    seed_hints: PosInt
    new_hints: PosInt
    question_per_pair: bool
    question_temperature: NonNegFloat
    question_top_p: Prob
    question_max_new_tokens: PosInt
    question_stop: tuple[str, ...]
    # merge
    contamination_rouge: Prob


# ---------------------------------------------------------------------------------------- self_align
class SelfAlignConfig(_Section):
    """Step 2: principle-driven self-alignment under the 16-principle, 6-exemplar preamble."""

    principles_file: str
    exemplars_file: str
    exclude: tuple[str, ...]
    seed: int
    temperature: NonNegFloat
    top_p: Prob
    max_new_tokens: PosInt
    logit_bias: dict[str, float]
    min_answer_chars: NonNegInt
    min_brief_answer_chars: NonNegInt
    thought_echo_rouge: Prob
    thought_echo_openers: tuple[str, ...]
    behaviour_checks: dict[str, tuple[str, ...]]
    # a refusal is kept only when its thought cites this principle, judges harm and the prompt's type is harmful
    refusal_principle: str
    harm_judgement: tuple[str, ...]
    harmful_types: tuple[str, ...]
    # an answer to a harmful-type prompt that does not refuse is dropped (harmful_compliance)
    drop_harmful_compliance: bool
    # an answer sharing a run of this many words with an exemplar's answer recites it (copied_exemplar)
    exemplar_copy_words: PosInt
    # an answer whose most frequent loop_ngram_words-word chunk occurs loop_min_count times loops (loop)
    loop_ngram_words: PosInt
    loop_min_count: Annotated[int, Field(ge=2)]
    template_file: str
    persona_file: str
    identity_file: str
    limit: PosInt | None
    stop_at_turn_end: bool
    repetition_min_chunk_chars: NonNegInt
    apology_openers: tuple[str, ...]
    # share of kept step-2 answers (by prompt-id hash) never trained on: the held-out teacher answers
    heldout_fraction: Annotated[float, Field(ge=0.0, le=0.9)]

    @field_validator("behaviour_checks", "harm_judgement")
    @classmethod
    def _patterns_compile(cls, value: Any) -> Any:
        # a broken pattern would otherwise surface only after the whole generation pass
        for pattern in (p for ps in value.values() for p in ps) if isinstance(value, dict) else value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return value

    @field_validator("refusal_principle")
    @classmethod
    def _refusal_is_checked(cls, name: str, info: ValidationInfo) -> str:
        checks = info.data.get("behaviour_checks")
        if checks is not None and name not in checks:
            raise ValueError(f"must name an entry of self_align.behaviour_checks {list(checks)}")
        return name


# ---------------------------------------------------------------------------------------------- lora
class LoraConfig(_Section):
    """LoRA adapter shape, shared by engrave and verbose_clone (paper: q/k/v/o, r=16, alpha=16)."""

    r: PosInt
    alpha: Annotated[float, Field(gt=0)]
    dropout: Prob
    target_modules: tuple[str, ...]


ACCELERATE_CONFIGS = "configs/accelerate"  # the engrave / verbose_clone dep holding launcher.config_file


class LauncherConfig(_Section):
    """How the stage's training runs (``training/launch.py``): in the stage's own process (``none``), or
    re-executed under ``accelerate launch`` with ``num_processes`` processes, ``mixed_precision``
    (null = the config file's / accelerate's default) and an accelerate ``config_file`` (DDP, FSDP or
    DeepSpeed as ``configs/accelerate/*.yaml`` express them; null = plain data parallel)."""

    kind: Literal["none", "accelerate"]
    num_processes: PosInt
    mixed_precision: Literal["no", "fp16", "bf16"] | None
    config_file: str | None

    @field_validator("num_processes", "mixed_precision", "config_file")
    @classmethod
    def _only_when_launched(cls, value: Any, info: ValidationInfo) -> Any:
        # a knob that a single in-process run would silently ignore is an error, not a no-op
        unset = 1 if info.field_name == "num_processes" else None
        if info.data.get("kind") == "none" and value != unset:
            raise ValueError(f"must be {json.dumps(unset)} with kind: none (set kind: accelerate to use it)")
        return value

    @field_validator("config_file")
    @classmethod
    def _under_the_declared_dep(cls, value: str | None) -> str | None:
        # dvc.yaml declares the directory, not the file (${...} cannot interpolate null): a file elsewhere
        # would change the training while DVC reports the stage up to date
        if value is not None and not os.path.normpath(value).replace(os.sep, "/").startswith(f"{ACCELERATE_CONFIGS}/"):
            raise ValueError(f"must lie under {ACCELERATE_CONFIGS}/ (the stage's DVC dep), got {value!r}")
        return value


class TrainConfig(_Section):
    """One LoRA SFT run (the recipe in ``training/lora.py``).

    The effective batch is ``micro_batch_size * grad_accum_steps * launcher.num_processes``;
    ``expected_effective_batch`` (null = not checked) states it, so a profile that promises the paper's
    batch fails at config time, not after a run at another batch (checked again at run time against the
    processes and accumulation the run actually got)."""

    epochs: Annotated[float, Field(gt=0)]
    learning_rate: Annotated[float, Field(gt=0)]
    micro_batch_size: PosInt
    grad_accum_steps: PosInt
    warmup_steps: NonNegInt
    weight_decay: NonNegFloat
    max_grad_norm: NonNegFloat
    max_length: PosInt
    seed: int
    length_grouping: NonNegInt
    loss_weighting: Literal["step", "epoch"]
    gradient_checkpointing: bool
    share_prefix: bool
    packing: bool
    pack_row_tokens: PosInt
    final_loss_window: PosInt
    limit: PosInt | None
    select: Literal["heldout_nll", "last"]
    launcher: LauncherConfig
    expected_effective_batch: PosInt | None

    @field_validator("expected_effective_batch")
    @classmethod
    def _effective_batch_as_stated(cls, expected: int | None, info: ValidationInfo) -> int | None:
        parts = [info.data.get(k) for k in ("micro_batch_size", "grad_accum_steps")]
        launcher = info.data.get("launcher")
        if expected is None or None in parts or launcher is None:
            return expected
        micro, accum = parts
        actual = micro * accum * launcher.num_processes
        if actual != expected:
            raise ValueError(f"the effective batch micro_batch_size {micro} x grad_accum_steps {accum} x "
                             f"launcher.num_processes {launcher.num_processes} is {actual}, not {expected}")
        return expected


class EngraveConfig(_Section):
    """Step 3: principle engraving (LoRA SFT without principles/exemplars in context)."""

    template: Literal["chat", "plain"]
    system_prompt_file: str | None
    train: TrainConfig


class VerboseCloneConfig(_Section):
    """Step 4: verbose cloning (context distillation from the engraved model)."""

    prompt_file: str
    seed: int
    temperature: NonNegFloat
    top_p: Prob
    max_new_tokens: PosInt
    ngram_penalties: tuple[NonNegFloat, ...]
    max_list_items: PosInt
    min_chars: NonNegInt
    limit: PosInt | None
    identity_file: str | None
    copy_ngram_words: PosInt
    banned_substrings: tuple[str, ...]
    # looping answers are dropped (loop), as in step 2
    loop_ngram_words: PosInt
    loop_min_count: Annotated[int, Field(ge=2)]
    train: TrainConfig


# ------------------------------------------------------------------------------------------ evaluate
class PaperEvalConfig(_Section):
    """Dromedary-style MC variants (true/false TruthfulQA MC1, HHH A/B both orders); our wording."""

    enabled: bool
    limit: PosInt | None
    tf_user: str
    tf_assistant_prefix: str
    true_word: str
    false_word: str
    hhh_user: str
    hhh_assistant_prefix: str
    a_word: str
    b_word: str


class VicunaEvalConfig(_Section):
    """How each variant answers the Vicuna questions."""

    enabled: bool
    per_category: PosInt | None
    temperature: NonNegFloat
    top_p: Prob
    max_new_tokens: PosInt


class JudgeConfig(_Section):
    """The pairwise Vicuna judge: a local HF model (weak) or an OpenAI-compatible endpoint."""

    engine: Literal["hf", "openai"]
    openai: OpenAIEngineConfig
    prompt_file: str
    answer_prefix: str
    max_new_tokens: PosInt
    max_answer_chars: PosInt
    pairs: tuple[tuple[str, str], ...]


class ProbeEvalConfig(_Section):
    """Principle probes (``evaluation/probes.py``): preference margins and judged greedy replies."""

    enabled: bool
    dir: str
    max_new_tokens: PosInt
    contamination_rouge: Prob
    judge_prompt_file: str
    judge_max_new_tokens: PosInt


class HarmEvalConfig(_Section):
    """Do-no-harm checks (``evaluation/harm.py``): degeneration (loops) and refusal of harmful requests."""

    loop_ngram_words: PosInt
    loop_min_count: Annotated[int, Field(ge=2)]
    refusal_set: str


Variant = Literal["base", "instructed", "prompted", "engraved", "verbose"]


class EvaluateConfig(_Section):
    """Evaluation of every variant (TruthfulQA MC1/MC2, HHH, Vicuna-80, principle probes, harm checks)."""

    variants: tuple[Variant, ...]
    control: Variant
    limit: PosInt | None
    bootstrap_iters: NonNegInt
    seed: int
    prompted_thought_tokens: NonNegInt
    paper: PaperEvalConfig
    vicuna: VicunaEvalConfig
    probes: ProbeEvalConfig
    harm: HarmEvalConfig
    judge: JudgeConfig

    @field_validator("control")
    @classmethod
    def _control_is_evaluated(cls, control: str, info: ValidationInfo) -> str:
        variants = info.data.get("variants")
        if variants is not None and control not in variants:
            raise ValueError(f"the control must be one of evaluate.variants {list(variants)}")
        return control


# ------------------------------------------------------------------------------------------ tracking
class CompareConfig(_Section):
    """Columns of ``selfalign compare`` (label -> MLflow metric key; ``{variant}`` is substituted)."""

    variant: str
    columns: dict[str, str]


class ReplicateConfig(_Section):
    """Seed replicates of ``selfalign replicate`` (replicate i: each step 2-4 seed + i * seed_stride)."""

    seed_stride: PosInt


class UiConfig(_Section):
    """``selfalign ui``: where ``mlflow ui`` listens and which headline metrics its runs table shows."""

    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    # shell-style patterns over the headline metric names (eval/headline.json), in display order
    columns: list[str] = Field(min_length=1)


class TrackingConfig(_Section):
    """MLflow: where runs go, what they are called and what ``track``/``compare``/``ui`` show."""

    enabled: bool
    experiment_name: str
    sample_lines: NonNegInt
    replicate: ReplicateConfig
    compare: CompareConfig
    ui: UiConfig


class Config(_Section):
    """The whole ``params.yaml``: one attribute per section."""

    model: ModelConfig
    benchmarks: BenchmarksConfig
    generation: GenerationConfig
    red_team: RedTeamConfig
    self_align: SelfAlignConfig
    lora: LoraConfig
    engrave: EngraveConfig
    verbose_clone: VerboseCloneConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig


def parse_config(data: Any, source: str = "params.yaml") -> Config:
    """Validate already-parsed params data; raise :class:`ConfigError` with named-key messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = [format_error(Config, source, e) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate a params file; YAML syntax errors name the file and line."""
    path = Path(path)
    return parse_config(load_yaml(path, ConfigError), source=str(path))


def project_config() -> Config:
    """The repository's ``params.yaml``, validated: the defaults for callers given no params file."""
    return load_config(PROJECT_PARAMS)


# ------------------------------------------------------------------------------------ read recording
# Which params a stage actually reads, seen at run time (tests/test_dvc_deps.py holds them against the stage's
# dvc.yaml ``params:``; an AST scan of ``config.x.y`` chains missed reads through helpers and aliases). Off by
# default: the hook is installed on the section classes only while recording, so normal runs pay nothing.
# ``SELFALIGN_RECORD_CONFIG_READS=<file>`` records a whole process (a `dvc repro` stage) and appends the
# sorted dotted keys to <file> as one JSON line at exit.
RECORD_ENV = "SELFALIGN_RECORD_CONFIG_READS"
_reads: set[str] | None = None
# id(section) -> (the section, its dotted path, fields a model_copy(update=...) set in code, not from params)
_paths: dict[int, tuple[weakref.ref, str, frozenset[str]]] = {}


def _entry(section: _Section) -> tuple[str, frozenset[str]] | None:
    if type(section) is Config:
        return "", frozenset()
    entry = _paths.get(id(section))
    return (entry[1], entry[2]) if entry is not None and entry[0]() is section else None


def _path_of(section: _Section) -> str | None:
    entry = _entry(section)
    return None if entry is None else entry[0]


def _tag(value: Any, dotted: str, overridden: frozenset[str] = frozenset()) -> None:
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, _Section) and _entry(v) is None:
            _paths[id(v)] = (weakref.ref(v), dotted, overridden)


def _recording_getattribute(self: _Section, name: str) -> Any:
    value = object.__getattribute__(self, name)
    if name.startswith("_") or name not in type(self).model_fields or _reads is None:
        return value
    entry = _entry(self)
    if entry is None or name in entry[1]:  # built on its own (project_section, a test), or set by code
        return value
    path = entry[0]
    dotted = f"{path}.{name}" if path else name
    if isinstance(value, _Section) or (isinstance(value, (tuple, list)) and value and
                                       all(isinstance(v, _Section) for v in value)):
        _tag(value, dotted)
    else:
        _reads.add(dotted)
    return value


def _recording_model_copy(self: _Section, *args: Any, **kwargs: Any) -> Any:
    """A copy keeps its original's place (``generation`` with the engine forced to hf is still generation.*)."""
    copy = BaseModel.model_copy(self, *args, **kwargs)
    entry = _entry(self)
    if entry is not None and entry[0] != "":
        update = kwargs.get("update") or (args[0] if args else None) or {}
        _tag(copy, entry[0], entry[1] | frozenset(update))
    return copy


@contextmanager
def record_reads() -> Iterator[set[str]]:
    """Collect the dotted keys (``evaluate.judge.openai.base_url``) of every config leaf read inside the block,
    reached from a :class:`Config` (copies of its sections included)."""
    global _reads
    outer, _reads = _reads, set()
    _Section.__getattribute__ = _recording_getattribute  # type: ignore[method-assign]
    _Section.model_copy = _recording_model_copy  # type: ignore[method-assign]
    try:
        yield _reads
    finally:
        if outer is None:
            del _Section.__getattribute__, _Section.model_copy
        else:
            outer.update(_reads)
        _reads = outer


def _record_process(path: str) -> None:
    import atexit

    ctx = record_reads()
    reads = ctx.__enter__()

    def dump() -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(sorted(reads)) + "\n")

    atexit.register(dump)


if os.environ.get(RECORD_ENV):
    _record_process(os.environ[RECORD_ENV])


def project_section(dotted: str, **overrides: Any) -> Any:
    """One section of the repository's ``params.yaml`` (``"engrave.train"``), ``overrides`` applied.

    The result is re-validated (``model_copy(update=...)`` would skip the type and bound checks), and a
    bad override names the section and key like a params file would.
    """
    section: Any = project_config()
    for part in dotted.split("."):
        section = getattr(section, part)
    data = {**section.model_dump(), **overrides}
    try:
        return type(section).model_validate(data)
    except ValidationError as exc:
        source = f"{PROJECT_PARAMS} + overrides"
        prefix = tuple(dotted.split("."))
        lines = [format_error(Config, source, {**e, "loc": prefix + tuple(e["loc"])}) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
