"""The kernel benchmark's report (benchmarks/bench_kernels.py): the targets and the "ahead of fla" verdict are judged
on rows the benchmark writes, and the verdict lines say MET / MISSED / YES / NO as hand-computed here."""
import sys
import types

from benchmarks import bench_kernels as bk


def row(shape, mode, ours, fla):
    return dict(card="card", date="2026-11-27", shape=shape, mode=mode, ours_ms=ours, fla_gdn2_ms=fla, fla_kda_ms=None,
                floor_ms=1.0, ours_over_fla_gdn2=None if fla is None else round(ours / fla, 3),
                ours_over_floor=ours)


def test_targets_and_default_modes_name_rows_the_benchmark_writes():
    for B, T in bk.SHAPES:
        assert set(bk.default_modes(f"B{B}_T{T}")) <= set(bk.CHUNK_MODES)
    assert bk.default_modes("B8_T4096")[0] == "infer_fwd_apply_a"              # 8 x 16 = 128 walks
    assert bk.default_modes("B2_T16384")[0] == "infer_fwd_merged"              # 32
    for (shape, mode), _ in bk.TARGETS.items():
        assert mode in bk.CHUNK_MODES or mode == "decode_step_graph", mode
        assert shape in {f"B{B}_T{T}" for B, T in bk.SHAPES} | {"B1_T1"}, shape


def test_verdicts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", types.SimpleNamespace(__version__="0.0-test"))
    rows = [row("B8_T4096", "infer_fwd_apply_a", 2.2, 2.3), row("B8_T4096", "fwd_bwd_merged", 8.8, 12.4),
            row("B8_T4096", "infer_fwd_merged", 2.4, 2.3),          # not the default at B=8: not judged
            row("B8_T4096", "train_fwd_merged", 2.0, 2.5), row("B1_T65536", "train_fwd_merged", 5.7, 5.5),
            row("B8_T4096", "train_fwd", 9.0, 2.0),                 # not a default row: not judged
            row("B1_T1", "decode_step", 0.01, 0.02), row("B1_T1", "decode_step_graph", 0.03, None)]
    path = tmp_path / "report.md"
    bk.write_markdown(rows, "card", 3e12, str(path))
    text = path.read_text()
    assert "- B8_T4096 infer_fwd_apply_a <= 1.1 ms: 2.2 ms, MISSED (2.00x over)" in text
    assert "- B8_T4096 fwd_bwd_merged <= 9.0 ms: 8.8 ms, MET" in text
    assert "- B1_T1 decode_step_graph <= 0.02 ms: 0.03 ms, MISSED (1.50x over)" in text
    assert "NO (worst: B1_T65536 train_fwd_merged, ours / fla = 1.036)" in text
    rows[4] = row("B1_T65536", "train_fwd_merged", 5.4, 5.5)
    bk.write_markdown(rows, "card", 3e12, str(path))
    assert "YES (worst: B1_T65536 train_fwd_merged, ours / fla = 0.982)" in path.read_text()


def test_report_without_fla(tmp_path, monkeypatch):
    """A --skip-fla run on a machine without fla still writes its report (the H100 run of 2026-11-27 failed here)."""
    monkeypatch.setitem(sys.modules, "fla", None)              # import fla -> ImportError
    path = tmp_path / "report.md"
    bk.write_markdown([row("B8_T4096", "infer_fwd_fused", 2.2, None)], "card", 3e12, str(path))
    text = path.read_text()
    assert "fla not installed" in text
    assert "| B8_T4096 | infer_fwd_fused | 2.2 | - |" in text


def test_every_mode_is_compared_with_an_fla_mode():
    assert {bk.fla_mode_of(m) for m in bk.CHUNK_MODES} == {"infer_fwd", "train_fwd", "fwd_bwd"}
