"""Heatmaps and forest plots: a PNG for every grid, missing cells drawn as "-", the empty grid still a file."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

from selfalign import plots  # noqa: E402


def _texts(monkeypatch):
    """Capture every cell label drawn (Axes.text calls)."""
    from matplotlib.axes import Axes

    drawn: list[tuple[str, str]] = []
    original = Axes.text

    def spy(self, x, y, s, *args, **kwargs):
        drawn.append((s, kwargs.get("color", "black")))
        return original(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(Axes, "text", spy)
    return drawn


def test_value_heatmap_labels_cells_and_marks_missing(tmp_path, monkeypatch):
    drawn = _texts(monkeypatch)
    path = plots.value_heatmap(["base", "prompted"], ["ethical", "static"], [[0.1, math.nan], [1.0, -0.2]],
                               [["0.10", "?"], ["1.00", "-0.20"]], tmp_path / "m.png", "margins", "margin")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s for s, _ in drawn] == ["0.10", "-", "1.00", "-0.20"]
    assert dict(drawn)["1.00"] == "white" and dict(drawn)["0.10"] == "black"  # deep colour -> white text


def test_value_heatmap_without_columns_still_writes_the_file(tmp_path):
    path = plots.value_heatmap([], [], [], [], tmp_path / "empty.png", "margins", "margin")
    assert path.stat().st_size > 0


def test_delta_forest_marks_only_significant_deltas_and_missing_ones(tmp_path, monkeypatch):
    drawn = _texts(monkeypatch)
    panel = plots.ForestPanel("TQA (rate)", ("-ethical", "-static", "-candor"), (0.02, -0.3, math.nan),
                              (-0.01, -0.4, None), (0.05, -0.2, None), (False, True, False), (-0.5, 0.5))
    path = plots.delta_forest([panel], tmp_path / "f.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s for s, _ in drawn] == ["+0.020", "-0.300*", "-"]
    assert dict(drawn)["+0.020"] == "0.55"  # not significant: grey, whatever its size
