"""bench/: the arithmetic of the benchmarks that run only on a GPU (their timings are never asserted)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def test_kernel_floor_at_790_tflops_is_the_issues_floor():
    "bench_kernels.floors with every product and attention priced at 790 TFLOP/s gives issue 10's arithmetic: 6.9 s for T2I 1024²."
    from bench.bench_kernels import FUSED, HD, LINEARS, NH, floors, kv_lengths
    rate, t = 790e12, {}
    for m in (4096, 8192):
        for name, (k, n) in {**LINEARS, **FUSED}.items(): t[name, m] = 2 * m * k * n / rate
    for what, L in kv_lengths(64).items(): t["attn", what] = 4 * 4096 * L * HD * NH / rate
    t2i, edit = floors(t, vae=0.0)
    assert t2i == pytest.approx(6.87, abs=0.01)        # 90 passes x 60.3 TFLOP (issue 10's table: 6.9 s)
    # edit: 147 passes of the expert; two branches see the source's 4096 VAE + 4900 ViT tokens, one only text
    assert edit == pytest.approx(49 * 3 * 53.5e12 / rate + 49 * 28 * 4 * 4096 * HD * NH * (2 * 13156 + 4160) / rate, rel=2e-3)
    assert floors(t, vae=0.1)[0] == pytest.approx(t2i + 0.1)

def test_times_and_op_tables_with_a_trace(tmp_path, monkeypatch):
    "bench.common: times() sorted, timeit() their median; op_tables(trace=...) writes the gzipped Chrome trace of the call."
    import gzip, json
    import torch
    from bench import common
    for fn, want in ((common.times, [1.0, 2.0, 3.0]), (common.timeit, 2.0)):
        seq = iter([0.0, 3.0, 3.0, 4.0, 4.0, 6.0])                 # perf_counter readings: calls of 3, 1 and 2 s
        monkeypatch.setattr(common.time, "perf_counter", lambda: next(seq))
        assert fn(lambda: None, warmup=1, iters=3) == want
    monkeypatch.undo()
    table = common.op_tables(lambda: torch.ones(8, 8) @ torch.ones(8, 8), trace=tmp_path / "t.json.gz")
    assert "aten::mm" in table
    events = json.loads(gzip.open(tmp_path / "t.json.gz").read())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events) and not list(tmp_path.glob("*.part"))
