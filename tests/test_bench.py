"""``lineside bench``: one table, identical frames, parity and ratios per backend; a backend that fails is a row."""

from conftest import REPO
from lineside.runtime.bench import format_table, run_bench

TINY = str(REPO / "tests" / "data" / "pre_namespace_tiny.ckpt")


def test_bench_rows_for_eager_and_onnxruntime(monkeypatch):
    rows, ctx = run_bench(TINY, "cpu", batch=4, iters=3, images=8, only=["eager", "onnxruntime fp32"])
    by = {r.backend: r for r in rows}
    assert list(by) == ["eager", "onnxruntime fp32"]
    ort = by["onnxruntime fp32"]
    assert ort.error == "" and ort.parity == "PASS" and ort.max_abs_diff < 1e-4 and ort.agreement == 1.0
    assert 0 < ort.p50_ms <= ort.p99_ms and ort.throughput > 0
    table = format_table(rows, ctx)
    assert "| onnxruntime fp32 | PASS" in table and "x** |" in table and ctx["input_size"] == [64, 64]


def test_a_backend_that_cannot_be_built_is_a_row_not_a_crash(monkeypatch):
    from lineside.runtime import bench

    real = bench._builders

    def broken(*args):
        return [*real(*args)[:1], ("exotic", lambda: (_ for _ in ()).throw(RuntimeError("no such runtime here")))]

    monkeypatch.setattr(bench, "_builders", broken)
    rows, ctx = run_bench(TINY, "cpu", batch=2, iters=2, images=4)
    assert [r.backend for r in rows] == ["eager", "exotic"]
    assert rows[1].error == "RuntimeError: no such runtime here" and rows[0].parity == "PASS"
    assert "no such runtime here" in format_table(rows, ctx)
