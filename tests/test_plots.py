"""The plots of a known store say what they show: n and the interval in the legend / caption, empty heatmap bins
masked (not 50%), every model side by side in one heatmap figure, and the attention model placed on the state axis."""
from __future__ import annotations

import pytest

from harness import plots
from harness.results import load_results
from test_report import KV_FLOATS_PER_TOKEN, build_known_store


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return load_results(build_known_store(tmp_path_factory.mktemp("plots")))


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, by file stem, instead of writing them."""
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out, stem: drawn.setdefault(stem, fig) and [stem])
    yield drawn
    plots._plt().close("all")


def _texts(fig) -> str:
    parts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        parts.append(ax.get_title())
        legend = ax.get_legend()
        if legend:
            parts += [t.get_text() for t in legend.get_texts()] + [legend.get_title().get_text()]
    for legend in fig.legends:
        parts += [t.get_text() for t in legend.get_texts()]
    return "\n".join(parts)


def test_depth_grid_means_and_empty_bins(results):
    # gdn2-demo at 1K: samples i = 0..4 at depth 10 + 20 i (bins 1, 3, 5, 7, 9), scores 100 unless (i + 1) % 3 == 0
    lengths, mean, count = plots.depth_grids(results, "niah_single_1")["gdn2-demo"]
    assert lengths == [1024, 2048]
    assert count[:, 0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert [mean[b, 0] for b in (1, 3, 5, 7, 9)] == [100.0, 100.0, 0.0, 100.0, 100.0]
    assert mean.mask[:, 0].tolist() == [c == 0 for c in count[:, 0]]      # empty: masked, never a number


def test_heatmap_puts_models_side_by_side_and_marks_empty_bins(results, figures):
    plots.needle_heatmaps(results, None)
    fig = figures["needle_heatmap_niah_single_1"]
    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert len(images) == 3                                       # the three models in one figure
    data = images[0].get_array()
    assert data.mask[0, 0] and not data.mask[1, 0]
    text = _texts(fig)
    assert "no samples" in text and "gdn2-demo\nn=10" in text


def test_accuracy_vs_length_names_interval_and_n(results, figures):
    plots.accuracy_vs_length(results, None)
    text = _texts(figures["accuracy_vs_length_niah_single_1"])
    assert "gdn2-demo (n=5)" in text and "95% interval of the mean" in text
    assert "mystery-demo (n=4)" in _texts(figures["accuracy_vs_length_niah_multikey_1"])


def test_state_size_places_the_attention_model_at_its_kv_cache(results, figures):
    points = {p["model"]: p for p in plots.state_size_points(results)}
    assert points["gdn2-demo"]["state"] == 262144 and points["gdn2-demo"]["cells"] == 3
    transformer = points["transformer-demo"]
    assert "state" not in transformer and transformer["kv_per_token"] == KV_FLOATS_PER_TOKEN["transformer-demo"]
    plots.accuracy_vs_state_size(results, None)
    ax = figures["accuracy_vs_state_size"].axes[0]
    segment = next(line for line in ax.get_lines() if line.get_label().startswith("transformer-demo"))
    kv = KV_FLOATS_PER_TOKEN["transformer-demo"]
    assert list(segment.get_xdata()) == [kv * 1024, kv * 2048]
    assert "KV cache at 1k–2k tokens" in segment.get_label()


def test_state_size_without_kv_size_draws_a_labelled_line(figures):
    points = [{"model": "rnn", "score": 50.0, "cells": 2, "lengths": [1024], "state": 65536.0},
              {"model": "attn", "score": 70.0, "cells": 2, "lengths": [1024], "kv_per_token": None}]
    ax = plots.accuracy_vs_state_size_figure(points).axes[0]
    line = next(line for line in ax.get_lines() if line.get_label().startswith("attn"))
    assert list(line.get_ydata()) == [70.0, 70.0] and "no fixed-size state" in line.get_label()


@pytest.mark.parametrize("n,label", [(65536, "64K"), (3 * 2 ** 20, "3M"), (96, "96"), (1536, "1.5K")])
def test_binary_label(n, label):
    assert plots.binary_label(n) == label
