"""The training issue's multi-GPU check: a hybrid-sharded run on N GPUs follows the 1-GPU loss curve on the same data.

Both runs train the ShapesWorld recipe's model from the same seeded init on the same written data for `--steps`
optimizer steps with the same global batch: one process with gradient accumulation over N packs, and N processes
(torchrun, NCCL) with FSDP2 HYBRID_SHARD on a (replicate 1, shard N) mesh, one pack each. Each rank reads its own
shard of the data, so the two runs see different packs of the same mix: the curves agree up to batch noise, not
bit for bit (the CPU tests check the bit-level equality of one step). Prints both curves side by side, their mean
absolute difference next to the step-to-step noise of the 1-GPU curve, and writes `curves.png` and `curves.json`.

    python bench/check_hybrid.py --config configs/shapesworld_gpu.yaml --steps 300 --gpus 2
"""
import argparse, json, os, subprocess, sys, time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _cfg(config: Path, out: Path, steps: int, accum: int, sharding: str, shard: int | None):
    from bagel.recipe import RecipeConfig
    cfg = RecipeConfig.from_yaml(config)
    train = {**cfg.train, "total_steps": steps, "gradient_accumulation_steps": accum, "max_seconds": None,
             "save_every": 10 * steps, "sharding_strategy": sharding, "num_replicate": 1, "num_shard": shard,
             "auto_resume": False, "progress": False, "log_every": max(1, min(cfg.train.get("log_every", 10), steps // 20))}
    return replace(cfg, out=str(out), train=train)

def _run(config, out, steps, accum, sharding, shard, base, mix, log=print):
    from bagel.recipe import train_bagel
    t0 = time.perf_counter()
    train_bagel(_cfg(config, out, steps, accum, sharding, shard), Path(base), Path(mix), log=log)
    return time.perf_counter() - t0

def _curve(run_dir: Path) -> list:
    from bagel.train import read_metrics
    return read_metrics(run_dir / "run")

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "shapesworld_gpu.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "check_hybrid")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)   # one rank of the N-GPU run (torchrun)
    ap.add_argument("--base"); ap.add_argument("--mix")
    a = ap.parse_args(argv)
    if a.worker:
        rank = int(os.environ.get("RANK", 0))
        _run(a.config, a.out / f"gpus{a.gpus}", a.steps, 1, "HYBRID_SHARD", a.gpus, a.base, a.mix,
             log=print if rank == 0 else (lambda *x: None))
        return
    import torch
    from bagel.recipe import RecipeConfig, make_base_dir, make_data
    prep = replace(RecipeConfig.from_yaml(a.config), out=str(a.out / "data"))
    mix, base = make_data(prep), make_base_dir(prep)
    print(f"== 1 GPU, gradient accumulation {a.gpus}", flush=True)
    t1 = _run(a.config, a.out / "gpus1", a.steps, a.gpus, "NO_SHARD", None, base, mix)
    print(f"== {a.gpus} GPUs, HYBRID_SHARD (replicate 1 x shard {a.gpus})", flush=True)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.gpus}", __file__,
                    "--worker", "--config", str(a.config), "--steps", str(a.steps), "--gpus", str(a.gpus),
                    "--out", str(a.out), "--base", str(base), "--mix", str(mix)], env=env, check=True)
    tn = time.perf_counter() - t0
    one, many = _curve(a.out / "gpus1"), _curve(a.out / f"gpus{a.gpus}")
    by = {r["step"]: r for r in many}
    rows = [(r["step"], r["loss"], by[r["step"]]["loss"]) for r in one if r["step"] in by]
    diff = sum(abs(x - y) for _, x, y in rows) / len(rows)
    noise = sum(abs(one[i + 1]["loss"] - one[i]["loss"]) for i in range(len(one) - 1)) / max(1, len(one) - 1)
    late = rows[len(rows) // 2:]
    rel = sum(abs(x - y) / x for _, x, y in late) / len(late)
    print(f"{'step':>6} {'1 GPU':>10} {f'{a.gpus} GPUs':>10}")
    for s, x, y in rows: print(f"{s:>6} {x:>10.4f} {y:>10.4f}")
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary = dict(device=f"{dev} x{a.gpus}", steps=a.steps, mean_abs_diff=diff, step_to_step_noise=noise,
                   late_mean_rel_diff=rel, seconds_1gpu=t1, seconds_ngpu=tn, curves={"gpus1": one, f"gpus{a.gpus}": many})
    print(f"mean |loss difference| {diff:.4f} vs step-to-step noise of the 1-GPU curve {noise:.4f}; second half: "
          f"{100 * rel:.1f}% relative; {t1:.0f} s on 1 GPU, {tn:.0f} s on {a.gpus} (incl. start-up)")
    (a.out / "curves.json").write_text(json.dumps(summary, indent=1))
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    for name, c in (("1 GPU (grad. accum.)", one), (f"{a.gpus} GPUs HYBRID_SHARD", many)):
        ax.plot([r["step"] for r in c], [r["loss"] for r in c], label=name)
    ax.set_xlabel("step"); ax.set_ylabel("loss (CE + MSE)"); ax.legend(); ax.set_title(f"ShapesWorld recipe, {dev}")
    fig.tight_layout(); fig.savefig(a.out / "curves.png", dpi=110)
    return summary

if __name__ == "__main__":
    main()
