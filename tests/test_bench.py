"""bench/: the arithmetic of the benchmarks that run only on a GPU (their timings are never asserted)."""
import json, sys
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

def test_bench_kernels_main_with_fake_timings(tmp_path, monkeypatch):
    "bench_kernels.main end to end on the host, each kernel's timer replaced by its FLOPs at 790 TFLOP/s: the table and both floors."
    import torch
    import bench.bench_kernels as bk
    rate = 790e12
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)           # main's guard; the report names the device
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "fake timings")
    monkeypatch.setattr(bk, "linear_time", lambda m, k, n: 2 * m * k * n / rate)
    monkeypatch.setattr(bk, "attention_time", lambda q, kv, backend: 4 * q * kv * bk.HD * bk.NH / rate)
    monkeypatch.setattr(bk, "vae_decode_time", lambda side: 0.5)
    monkeypatch.setattr(bk, "gpu_limits", lambda busy=True: "nvidia-smi (clocks): 1980 MHz")   # no nvidia-smi here
    bk.main(["--results", str(tmp_path / "R.md")])
    text = (tmp_path / "R.md").read_text()
    assert "kernel floor (issue 10)" in text and "| linear gate_up | 8192 x 3584 -> 37888 |" in text
    assert "T2I 1024²" in text and "**7.37 s**" in text                 # 6.87 s of kernels + the 0.5 s decode
    assert "| linear square (reference) | 16384 x 16384 -> 16384 | 11.13 | 790 |" in text    # not in the floor
    assert "nvidia-smi (clocks): 1980 MHz" in text

def test_probe_binding_reads_and_judges_grids(tmp_path):
    "bench/probe_binding.py: a pack carries each item's grid, the true grids pass as named / bound, swapped colours read as swapped, and a 2-step run writes its table row."
    import random
    from dataclasses import replace
    import torch
    from bagel.model import BagelConfig
    from bagel.packing import PackConfig
    from bagel.vae import patchify_latent
    from bagel import shapesworld as sw
    from bench.probe_binding import Vocab, World, item, judge, main, make_pack
    w, rng = World(64), random.Random(0)
    bc = BagelConfig.shapesworld()                     # a pack's latents hold each item's grid, cell i at token i
    pack = make_pack(random.Random(5), "color_attr", 3, w, Vocab(512), bc, PackConfig.from_model(bc))
    r = random.Random(5)
    assert torch.equal(patchify_latent(pack.padded_latent, 2), torch.stack([item(r, "color_attr", w)["tokens"] for _ in range(3)]))
    for kind, want in (("color_attr", "bound"), ("position", "as_named")):
        its = [item(rng, kind, w) for _ in range(20)]
        assert judge(its, [it["tokens"] for it in its], w) == {"items": 20, "pass": 20, "two": 20, "layouts": {want: 20}, "failures": {}}
    its = [item(rng, "color_attr", w) for _ in range(10)]
    def swapped(x):
        a, b = w.read(x)
        return w.tokens([replace(a, color=b.color), replace(b, color=a.color)])
    assert judge(its, [swapped(it["tokens"]) for it in its], w) == {"items": 10, "pass": 0, "two": 10, "layouts": {"swapped": 10},
                                                                   "failures": {"wrong_color": 10}}
    assert judge(its[:1], [torch.zeros(9, 64)], w)["layouts"] == {"no_pair": 1}    # nothing drawn
    its = [item(rng, "cell", w) for _ in range(20)]    # the control: one object where the prompt puts it, in words
    assert all(it["prompt"].split()[3] in ("in", "at", "on") for it in its) and len({it["spec"]["include"][0]["cell"] for it in its}) > 3
    assert judge(its, [it["tokens"] for it in its], w) == {"items": 20, "pass": 20, "two": 0, "layouts": {"no_pair": 20}, "failures": {}}
    moved = [torch.roll(it["tokens"], 1, 0) for it in its]                        # every object one cell on
    assert judge(its, moved, w)["pass"] == 0
    its = [item(rng, "anchored", w) for _ in range(40)]  # position prompts, the second-named shape always in the center
    assert judge(its, [it["tokens"] for it in its], w) == {"items": 40, "pass": 40, "two": 40, "layouts": {"as_named": 40}, "failures": {}}
    second = [max((r["shape"] for r in it["spec"]["include"]), key=it["prompt"].split().index) for it in its]
    assert [w.read(it["tokens"][4:5])[0].shape for it in its] == second
    assert {it["spec"]["include"][0]["shape"] == sh for it, sh in zip(its, second)} == {True, False}   # either reference
    its = [item(rng, "counting", w) for _ in range(20)]  # ShapesWorld's counting prompts: the true grids pass, one more fails
    assert judge(its, [it["tokens"] for it in its], w)["pass"] == 20
    def one_more(it):
        objs = w.read(it["tokens"]); free = next(c for c in sw.CELLS if c not in {o.cell for o in objs})
        return w.tokens(objs + [replace(objs[0], cell=free)])
    assert judge(its, [one_more(it) for it in its], w)["failures"] == {"too_many": 20}
    rows = main(["--steps", "2", "--per-pack", "4", "--eval-n", "2", "--cfg", "1", "--results", str(tmp_path / "R.md")])
    assert rows[0][:3] == ["color_attr", 1.0, 2] and rows[0][8] == 2 and "Binding probe" in (tmp_path / "R.md").read_text()
    rows = main(["--steps", "1", "--per-pack", "4", "--eval-n", "1", "--cfg", "1", "4", "--cfg-interval", "0,1", "0.4,1",
                 "--results", str(tmp_path / "R.md")])       # an interval only where there is guidance
    assert [r[6:8] for r in rows] == [[1.0, ""], [4.0, [0.0, 1.0]], [4.0, [0.4, 1.0]]]
    rows = main(["--steps", "1", "--per-pack", "4", "--eval-n", "1", "--cfg", "1", "--latent-rope", "raster", "--results", str(tmp_path / "R.md")])
    assert rows[0][0] == "color_attr (latent_rope raster)"

def test_plot_runs_times_logs_and_lays_out_samples(tmp_path):
    "bench/plot_runs.py: training seconds are the sum of each log window's tokens / tokens_per_s; curves and a samples strip are written; bad input is refused."
    from PIL import Image
    from bench.plot_runs import main, read_run
    def fake(name, rate):
        d = tmp_path / name; (d / "run").mkdir(parents=True)
        (d / "run" / "metrics.jsonl").write_text("".join(json.dumps({"step": 50 * k, "tokens": 1000, "tokens_per_s": rate,
                                                                       "ce": 1 / k, "mse": 0.5 / k}) + "\n" for k in (1, 2, 3)))
        for f in ("t2i_0", "edit_source", "edit", "vqa"): Image.new("RGB", (8, 8), (k := len(f) * 20, k, k)).save(d / f"{f}.png")
        (d / "report.json").write_text(json.dumps({"metrics": {"t2i": 0.5, "edit": 0.25, "vqa": 0.75}, "samples": [
            ["t2i", "a square", "t2i_0.png", True, None], ["edit", "Take away the square", "edit.png", False, None],
            ["vqa", "How many? -> '1' (truth: 1)", "vqa.png", True, None]]}))
        return d
    a, b = fake("a", 500.0), fake("b", 250.0)
    assert [r["seconds"] for r in read_run(a)["rows"]] == [2.0, 4.0, 6.0]
    assert [r["seconds"] for r in read_run(b)["rows"]] == [4.0, 8.0, 12.0]
    out = main(["--out", str(tmp_path / "c.png"), "--run", f"x=1=a={a}", "--run", f"b={b}"])   # the label may hold '='
    assert out.exists() and Image.open(out).size[0] > 1000
    assert main(["--out", str(tmp_path / "s.png"), "--samples", str(a)]).exists()
    with pytest.raises(SystemExit, match="not a saved learning run"): main(["--out", str(tmp_path / "d.png"), "--run", f"c={tmp_path}"])
    with pytest.raises(SystemExit, match="not both"): main(["--out", str(tmp_path / "d.png")])
