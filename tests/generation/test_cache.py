"""The phase cache over run_resumable: a finished phase is read back, not regenerated, only under the
same fingerprint, requests and sampling; unused files are pruned; the engine is built on first need."""

from __future__ import annotations

from fakes import FakeEngine

from selfalign.generation.base import Request, SamplingParams
from selfalign.generation.cache import GenerationCache

REQUESTS = [Request("a", "shared prefix ", "one"), Request("b", "shared prefix ", "two words")]
SAMPLING = SamplingParams(temperature=0.7, max_new_tokens=8, seed=1)


def _cache(tmp_path, engine: FakeEngine, built: list, fingerprint=None) -> GenerationCache:
    def factory():
        built.append(engine)
        return engine

    return GenerationCache(factory, tmp_path / "raw", fingerprint or {"model": "m", "code_sha256": "c"})


def test_finished_phase_is_read_back_without_building_an_engine(tmp_path):
    built: list = []
    first = _cache(tmp_path, FakeEngine(lambda r: f" reply to {r.text}"), built)
    records = first.run("phase", REQUESTS, SAMPLING)
    assert records["b"]["completion"] == " reply to two words" and records["b"]["prompt"] == "two words"
    assert first.tokens == 3 + 4 and first.gen_seconds > 0 and len(built) == 1
    (name,) = [p.name for p in (tmp_path / "raw").iterdir()]  # finalized: no partial or sidecar left
    assert name.startswith("phase-") and name.endswith(".jsonl")

    again = _cache(tmp_path, FakeEngine(lambda r: "never called"), built)
    assert again.run("phase", REQUESTS, SAMPLING) == records
    assert len(built) == 1 and again.gen_seconds == 0 and again.tokens == first.tokens


def test_changed_sampling_or_fingerprint_regenerates_and_prune_removes_the_stale_file(tmp_path):
    built: list = []
    _cache(tmp_path, FakeEngine(lambda r: " x"), built).run("phase", REQUESTS, SAMPLING)
    old = {p.name for p in (tmp_path / "raw").iterdir()}
    cache = _cache(tmp_path, FakeEngine(lambda r: " y"), built, {"model": "m", "code_sha256": "edited"})
    assert cache.run("phase", REQUESTS, SAMPLING)["a"]["completion"] == " y" and len(built) == 2
    hotter = SamplingParams(temperature=0.9, max_new_tokens=8, seed=1)
    cache.run("other", REQUESTS, hotter)
    assert len(list((tmp_path / "raw").iterdir())) == 3
    cache.prune()
    kept = {p.name for p in (tmp_path / "raw").iterdir()}
    assert len(kept) == 2 and not kept & old and {n.split("-")[0] for n in kept} == {"phase", "other"}


def test_no_requests_build_nothing(tmp_path):
    built: list = []
    assert _cache(tmp_path, FakeEngine(lambda r: ""), built).run("empty", [], SAMPLING) == {} and built == []
