"""bagel.eval: resume after an interruption or a kill, sharding equals one process, run records, the CLI, on the tiny checkpoint."""
import json, os, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch

from bagel.eval import (BagelEngine, ScriptedEngine, ShapesWorldBench, main, read_done, run, score)
from bagel.inferencer import Inferencer
from bagel.testing import write_tiny_checkpoint

FAST = {"num_timesteps": 2, "max_new_tokens": 4}

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny")

@pytest.fixture(scope="module")
def engine(tiny_dir):
    return BagelEngine(Inferencer.from_pretrained(tiny_dir, dtype=torch.float32), model_id="tiny")

class Counting:
    "An engine wrapper counting how often each item is produced."
    def __init__(self, inner): self.inner, self.calls = inner, []
    def describe(self): return self.inner.describe()
    def for_benchmark(self, b): self.inner = self.inner.for_benchmark(b); return self
    def generate(self, item, seed, s): self.calls.append(item.id); return self.inner.generate(item, seed, s)
    def answer(self, item, seed, s): self.calls.append(item.id); return self.inner.answer(item, seed, s)

def _files(out: Path) -> dict:
    "Every output file (bookkeeping excluded) -> its bytes."
    skip = {"run.json", "summary.json", "summary.md"}
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in skip and not p.name.startswith("done-")}

def _stop_after(k):
    def cb(item_id, n_done, n_shard):
        if n_done == k: raise KeyboardInterrupt(f"stopped after {k}")
    return cb

@pytest.fixture(scope="module")
def reference(engine, tmp_path_factory):
    "One uninterrupted single-process run."
    out = tmp_path_factory.mktemp("ref")
    return out, run(ShapesWorldBench(n=2), engine, None, out, FAST, verbose=False)

def test_reference_runs_end_to_end(reference):
    out, summary = reference
    assert set(read_done(out)) == {"t2i/0000", "t2i/0001", "edit/0000", "vqa/0000", "vqa/0001"}
    m = summary["metrics"]
    assert {"t2i", "edit", "vqa", "overall"} <= set(m) and all(0 <= v <= 1 for v in m.values())
    assert (out / "t2i" / "0000.png").exists() and (out / "edit" / "0000_src.png").exists() and (out / "vqa.jsonl").exists()
    assert json.loads((out / "summary.json").read_text())["record"]["settings"]["num_timesteps"] == 2

def test_interrupted_run_resumes_without_redoing_or_losing_items(engine, reference, tmp_path):
    ref_out, ref = reference
    eng = Counting(engine)
    with pytest.raises(KeyboardInterrupt):
        run(ShapesWorldBench(n=2), eng, None, tmp_path, FAST, on_item=_stop_after(2), verbose=False)
    assert len(read_done(tmp_path)) == 2 and len(eng.calls) == 2
    summary = run(ShapesWorldBench(n=2), eng, None, tmp_path, FAST, verbose=False)
    assert sorted(eng.calls) == sorted(read_done(ref_out))               # every item exactly once
    assert summary["metrics"] == ref["metrics"]
    assert _files(tmp_path) == _files(ref_out)                           # byte-identical outputs
    lines = [l for f in tmp_path.glob("done-*.jsonl") for l in f.read_text().splitlines()]
    assert len(lines) == 5                                               # no duplicate done lines

def test_batched_run_equals_item_by_item(engine, reference, tmp_path):
    "batch_size=4: T2I prompts and greedy questions go in one call each; outputs equal the item-by-item run."
    import numpy as np
    from PIL import Image
    ref_out, ref = reference
    calls = []
    class Spy(BagelEngine):
        def for_benchmark(self, b): return Spy(super().for_benchmark(b).inf, self.model_id)
        def generate_batch(self, items, seeds, s): calls.append(("gen", len(items))); return super().generate_batch(items, seeds, s)
        def answer_batch(self, items, seeds, s): calls.append(("und", len(items))); return super().answer_batch(items, seeds, s)
    summary = run(ShapesWorldBench(n=2), Spy(engine.inf, "tiny"), None, tmp_path, FAST, batch_size=4, verbose=False)
    assert sorted(calls) == [("gen", 2), ("und", 2)]                      # the edit ran alone
    got, want = _files(tmp_path), _files(ref_out)
    assert got.keys() == want.keys()
    for k in want:
        if k.endswith(".png"):
            a, b = (np.asarray(Image.open(root / k), dtype=int) for root in (tmp_path, ref_out))
            assert np.abs(a - b).max() <= 1, k                           # fp32 batching: at most one grey level
        else: assert got[k] == want[k], k
    assert summary["metrics"] == ref["metrics"]
    with pytest.raises(ValueError, match="batch_size"): run(ShapesWorldBench(n=2), engine, None, tmp_path / "x", FAST, batch_size=0)

def test_engine_passes_the_step_cache(engine, reference, tmp_path):
    "A step cache that computes every call reproduces the plain run; the default one changes the images; both are recorded."
    from bagel.stepcache import StepCache
    ref_out, ref = reference
    full = run(ShapesWorldBench(n=2), BagelEngine(engine.inf, "tiny", step_cache=StepCache(fresh_threshold=1)), None,
               tmp_path / "full", {**FAST, "num_timesteps": 12}, verbose=False)
    plain = run(ShapesWorldBench(n=2), engine, None, tmp_path / "plain", {**FAST, "num_timesteps": 12}, verbose=False)
    assert _files(tmp_path / "full") == _files(tmp_path / "plain") and full["metrics"] == plain["metrics"]
    run(ShapesWorldBench(n=2), BagelEngine(engine.inf, "tiny", step_cache=StepCache()), None, tmp_path / "cached",
        {**FAST, "num_timesteps": 12}, verbose=False)
    assert _files(tmp_path / "cached")["t2i/0000.png"] != _files(tmp_path / "plain")["t2i/0000.png"]
    assert "StepCache(" in json.loads((tmp_path / "cached" / "run.json").read_text())["engine"]["step_cache"]

def test_two_shards_equal_one_process(engine, reference, tmp_path):
    ref_out, ref = reference
    assert run(ShapesWorldBench(n=2), engine, None, tmp_path, FAST, rank=1, world_size=2, verbose=False) is None
    assert set(read_done(tmp_path)) == {"t2i/0001", "vqa/0000"}          # items 1 and 3 of [t2i0, t2i1, edit0, vqa0, vqa1]
    summary = run(ShapesWorldBench(n=2), engine, None, tmp_path, FAST, rank=0, world_size=2, verbose=False)
    assert summary["metrics"] == ref["metrics"]
    assert _files(tmp_path) == _files(ref_out)

def test_killed_process_resumes(tmp_path):
    "A process killed (os._exit, no cleanup) after 3 items, with a torn done line; the rerun finishes the rest once."
    code = textwrap.dedent(f"""
        import os
        from bagel.eval import ScriptedEngine, ShapesWorldBench, run
        def cb(item_id, n_done, n_shard):
            if n_done == 3:
                open(os.path.join({str(tmp_path)!r}, "done-000.jsonl"), "a").write('{{"id": "vqa/00')
                os._exit(9)
        run(ShapesWorldBench(n=4), ScriptedEngine(text=lambda it: "yes"), None, {str(tmp_path)!r}, on_item=cb)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 9, p.stderr
    assert len(read_done(tmp_path)) == 3
    eng = Counting(ScriptedEngine(text=lambda it: "yes"))
    summary = run(ShapesWorldBench(n=4), eng, None, tmp_path, verbose=False)
    assert len(eng.calls) == 10 - 3 and summary["n_items"] == 10
    ids = [json.loads(l)["id"] for l in (tmp_path / "done-000.jsonl").read_text().splitlines() if l.startswith('{"id"') and l.endswith("}")]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 10

def test_run_record_refuses_a_different_run(tmp_path):
    eng = ScriptedEngine(text=lambda it: "no")
    run(ShapesWorldBench(n=2, tasks=("vqa",)), eng, None, tmp_path, verbose=False)
    with pytest.raises(ValueError, match="settings.max_new_tokens: 16 -> 5"):
        run(ShapesWorldBench(n=2, tasks=("vqa",)), eng, None, tmp_path, {"max_new_tokens": 5}, verbose=False)
    with pytest.raises(ValueError, match="params"):
        run(ShapesWorldBench(n=3, tasks=("vqa",)), eng, None, tmp_path, verbose=False)
    with pytest.raises(ValueError, match="engine"):
        run(ShapesWorldBench(n=2, tasks=("vqa",)), ScriptedEngine(model_id="other"), None, tmp_path, verbose=False)

def test_score_refuses_an_unfinished_run(tmp_path):
    eng = ScriptedEngine(text=lambda it: "no")
    run(ShapesWorldBench(n=2, tasks=("vqa",)), eng, None, tmp_path, rank=0, world_size=2, verbose=False)
    with pytest.raises(ValueError, match="1 of 2 items are not done yet"):
        score(ShapesWorldBench(n=2, tasks=("vqa",)), None, tmp_path, verbose=False)
    run(ShapesWorldBench(n=2, tasks=("vqa",)), eng, None, tmp_path, rank=1, world_size=2, verbose=False)
    assert score(ShapesWorldBench(n=2, tasks=("vqa",)), None, tmp_path, verbose=False)["metrics"]["vqa"] == 0.0

def test_cli_runs_and_scores(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["shapesworld", "--out", str(out), "--n", "1", "--set", "num_timesteps=2", "--set", "cfg_interval=(0, 1)"]
    assert main([*args, "--model-dir", str(tiny_dir)]) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["settings"]["cfg_interval"] == [0.0, 1.0] and rec["params"]["n"] == 1 and rec["engine"]["dtype"] == "float32"
    assert main([*args, "--score-only"]) == 0
    assert "| overall |" in capsys.readouterr().out
    assert main(["shapesworld", "--model-dir", str(tiny_dir)]) == 2
    assert main(["shapesworld", "--out", str(out), "--set", "steps=3", "--score-only"]) == 2
    assert "use name=value with name in" in capsys.readouterr().err
    assert main(["--list"]) == 0 and "geneval" in capsys.readouterr().out
