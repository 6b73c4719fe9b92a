"""The kernel benchmark's report (benchmarks/bench_kernels.py): the targets and the "ahead of fla" verdict are judged
on rows the benchmark writes, and the verdict lines say MET / MISSED / YES / NO as hand-computed here."""
import sys
import types

import pytest

from benchmarks import bench_kernels as bk


def row(shape, mode, ours, fla):
    return dict(card="card", date="2026-11-27", shape=shape, mode=mode, ours_ms=ours, fla_gdn2_ms=fla, fla_kda_ms=None,
                floor_ms=1.0, ours_over_fla_gdn2=None if fla is None else round(ours / fla, 3),
                ours_over_floor=ours)


def test_targets_name_rows_the_benchmark_writes():
    for (shape, mode), _ in bk.TARGETS.items():
        assert mode in bk.CHUNK_MODES or mode == "decode_step_graph", mode
        assert shape in {f"B{B}_T{T}" for B, T in bk.SHAPES} | {"B1_T1"}, shape


def test_verdicts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", types.SimpleNamespace(__version__="0.0-test"))
    rows = [row("B8_T4096", "infer_fwd", 2.2, 2.3), row("B8_T4096", "fwd_bwd", 8.8, 12.4),
            row("B8_T4096", "train_fwd", 2.0, 2.5), row("B1_T65536", "train_fwd", 5.7, 5.5),
            row("B8_T4096", "infer_fwd_probe", 9.0, 2.0),           # a row of no CHUNK_MODES mode: not judged
            row("B1_T1", "decode_step", 0.01, 0.02), row("B1_T1", "decode_step_graph", 0.03, None)]
    path = tmp_path / "report.md"
    bk.write_markdown(rows, "card", 3e12, str(path), bk.software())
    text = path.read_text()
    assert "- B8_T4096 infer_fwd <= 1.1 ms: 2.2 ms, MISSED (2.00x over)" in text
    assert "- B8_T4096 fwd_bwd <= 9.0 ms: 8.8 ms, MET" in text
    assert "- B1_T1 decode_step_graph <= 0.02 ms: 0.03 ms, MISSED (1.50x over)" in text
    assert "NO (worst: B1_T65536 train_fwd, ours / fla = 1.036)" in text
    rows[3] = row("B1_T65536", "train_fwd", 5.4, 5.5)
    bk.write_markdown(rows, "card", 3e12, str(path), bk.software())
    assert "YES (worst: B1_T65536 train_fwd, ours / fla = 0.982)" in path.read_text()


def test_report_without_fla(tmp_path, monkeypatch):
    """A --skip-fla run on a machine without fla still writes its report."""
    monkeypatch.setitem(sys.modules, "fla", None)              # import fla -> ImportError
    path = tmp_path / "report.md"
    bk.write_markdown([row("B8_T4096", "infer_fwd", 2.2, None)], "card", 3e12, str(path), bk.software())
    text = path.read_text()
    assert "fla not installed" in text
    assert "| B8_T4096 | infer_fwd | 2.2 | - |" in text


def test_rows_from_a_log_cut_short(tmp_path):
    """The rows rebuilt from a bench log's printed dicts, one shape with fla and one without (hand-computed floor and
    ratio), and the rows a log lacks are left out."""
    ours8 = {mode: 1.0 for mode in bk.CHUNK_MODES}
    ours1 = {"infer_fwd": 4.0}
    text = ("card X; copy bandwidth 3.00 TB/s (read + write)\n"
            f"ours B8_T4096: {ours8}\n"
            "fla gdn2 B8_T4096: {'infer_fwd': 2.0, 'train_fwd': 2.5, 'fwd_bwd': 12.0}\n"
            f"ours B1_T65536: {ours1}\n")
    rows, bw, soft = bk.rows_from_log(text, "X")
    assert bw == 3.0e12 and soft == "software not in log"
    assert {r["date"] for r in rows} == {"not in log"}             # not the day it was rebuilt
    assert [r["shape"] for r in rows] == ["B8_T4096"] * len(bk.CHUNK_MODES) + ["B1_T65536"]
    infer8 = next(r for r in rows if r["shape"] == "B8_T4096" and r["mode"] == "infer_fwd")
    assert infer8["fla_gdn2_ms"] == 2.0 and infer8["ours_over_fla_gdn2"] == 0.5 and infer8["fla_kda_ms"] is None
    # forward floor: 8 * 4096 * 16 token-heads x (3 x 128 x 2 + 128 x 4 + 2 x 128 x 2 + 128 x 2) B at 3.0e12 B/s
    assert infer8["floor_ms"] == round(8 * 4096 * 16 * 2048 / 3.0e12 * 1e3, 4)
    assert rows[-1]["mode"] == "infer_fwd" and rows[-1]["fla_gdn2_ms"] is None
    with pytest.raises(ValueError, match="not a bench_kernels.py log"):
        bk.rows_from_log("ours B8_T4096: {}\n", "X")


def test_log_header_and_decode_rows_round_trip(tmp_path):
    """A log as main prints it (run_header, then the decode rows' table lines) gives back the run's date, software and
    decode rows; the report names the log's software, not this machine's."""
    header = bk.run_header("X", 3.0e12)
    decode = bk.make_row("X", 3.0e12, "B1_T1", "decode_step", 0.0062, 0.0984, None, 2_000_000)
    graph = bk.make_row("X", 3.0e12, "B1_T1", "decode_step_graph", 0.0024, None, None, 2_000_000)
    assert tuple(decode) == bk.ROW_KEYS
    text = header.replace(bk.software(), "triton 9.9, torch 9.9+cu, fla 9.9, GDN2_TRITON_AUTOTUNE=1") + "\n"
    text = text.replace(decode["date"], "2026-01-02")
    text += " | ".join(str(v) for v in decode.values()) + "\n" + " | ".join(str(v) for v in graph.values()) + "\n"
    rows, bw, soft = bk.rows_from_log(text, "X")
    assert soft == "triton 9.9, torch 9.9+cu, fla 9.9, GDN2_TRITON_AUTOTUNE=1" and bw == 3.0e12
    assert rows == [{**decode, "date": "2026-01-02"}, {**graph, "date": "2026-01-02"}]
    path = tmp_path / "report.md"
    bk.write_markdown(rows, "X", bw, str(path), soft)
    text = path.read_text()
    assert "(X, 2026-01-02)" in text and "triton 9.9, torch 9.9+cu, fla 9.9" in text


def test_later_runs_replace_rows_of_the_same_shape_and_mode():
    first = [row("B8_T4096", "infer_fwd", 1.6, None), row("B1_T1", "decode_step", 0.006, 0.098)]
    second = [row("B1_T65536", "infer_fwd", 4.2, 6.3), row("B8_T4096", "infer_fwd", 1.5, 2.3),
              row("B8_T4096", "fwd_bwd", 8.4, 12.4), row("B2_T16384", "infer_fwd", 1.7, 2.6)]
    merged = bk.merge_rows([first, second])
    assert [(r["shape"], r["mode"], r["ours_ms"]) for r in merged] == [
        ("B8_T4096", "infer_fwd", 1.5), ("B8_T4096", "fwd_bwd", 8.4),
        ("B2_T16384", "infer_fwd", 1.7), ("B1_T65536", "infer_fwd", 4.2), ("B1_T1", "decode_step", 0.006)]


def test_a_written_table_reads_back(tmp_path):
    """--merge reads runs' CSVs and the software line of the report beside each: what write_csv / write_markdown
    wrote comes back (numbers as floats, empty cells as None), and the floor gives back the copy bandwidth."""
    rows = bk.shape_rows("X", 3.0e12, 8, 4096, {"infer_fwd": 1.5, "fwd_bwd": 8.4}, {"infer_fwd": 2.3}, {})
    rows += [bk.make_row("X", 3.0e12, "B1_T1", "decode_step_graph", 0.0024, None, None,
                         bk.floor_bytes_of("B1_T1", "decode_step_graph"))]
    bk.write_csv(rows, str(tmp_path / "kernels-X.csv"))
    bk.write_markdown(rows, "X", 3.0e12, str(tmp_path / "kernels-X.md"), "triton 9.9, torch 9.9")
    assert bk.read_rows(str(tmp_path / "kernels-X.csv")) == rows
    assert bk.software_of_report(str(tmp_path / "kernels-X.md")) == "triton 9.9, torch 9.9"
    assert bk.software_of_report(str(tmp_path / "missing.md")) == "software not recorded"
    assert abs(bk.bandwidth_of(rows) / 3.0e12 - 1) < 1e-4          # from the 1.03 ms floor, rounded to 4 decimals
