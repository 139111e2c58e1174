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
