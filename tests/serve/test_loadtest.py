import pytest

from seglab.serve.loadtest import main, summarise


def test_summary_counts_and_percentiles():
    # 100 answers of 1..100 ms, three 503s and one connection failure (status 0) in 10 s.
    results = [(ms / 1000, 200) for ms in range(1, 101)] + [(0.001, 503)] * 3 + [(0.5, 0)]
    row = summarise("model.onnx", results, seconds=10)
    assert (row["requests"], row["ok"], row["throughput_per_s"]) == (104, 100, 10.0)
    assert (row["p50_ms"], row["p95_ms"], row["p99_ms"]) == pytest.approx((50.5, 95.05, 99.01))
    assert row["errors"] == {"0": 1, "503": 3}


@pytest.mark.slow  # a real uvicorn process per model and timed client load
def test_load_test_against_a_real_server(trained_run, capsys):
    rows = main(
        [trained_run["checkpoint"], "--clients", "1", "2", "--seconds", "2", "--size", "64", "--batching", "both"]
    )
    assert [(r["batching"], r["clients"]) for r in rows] == [("on", 1), ("on", 2), ("off", 1), ("off", 2)]
    assert all(r["ok"] > 0 and r["errors"] == {} and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] for r in rows)
    out = capsys.readouterr().out
    assert "seglab load test: 1/2 clients x 2 s per model" in out and "errors: none" in out
    ratios = [rows[i]["throughput_per_s"] / rows[i + 2]["throughput_per_s"] for i in (0, 1)]
    assert f"requests/s batched / unbatched: 1 clients {ratios[0]:.2f}x, 2 clients {ratios[1]:.2f}x" in out
