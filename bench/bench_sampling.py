"""ShapesWorld-Bench scores of one trained model under a grid of sampling settings.

A trained recipe model (the `model/` dir that `bagel demo` exports) is scored by the judge once per combination of
`--cfg-text-scale`, `--timestep-shift`, `--num-timesteps` and `--cfg-interval`, on the same held-out items and
the same noise. The training run fixes the weights; this shows how much of a score is the sampler's. Appends one table
to RESULTS.md; `--per-category` adds a column per prompt kind (counting, position, ...).

    python -m bench.bench_sampling --config configs/shapesworld_gpu.yaml --cfg-text-scale 2 4 7 --timestep-shift 1 3
    python -m bench.bench_sampling --config configs/shapesworld_cpu.yaml --tasks t2i --n 24 --num-timesteps 10 30
    python -m bench.bench_sampling --model-dir runs/sweep/NAME/model --set size=96 --timestep-shift 1 4   # a sweep's run
    python -m bench.bench_sampling --cfg-text-scale 1 2 4 --cfg-interval 0,1 0.4,1 0,0.6 --per-category

A run trained with `--set` overrides (`bagel demo`, `sweep_recipe`) is scored with the same `--set`s: the image size,
ViT side and bench seed come from the config.
"""
import argparse, itertools, shutil, tempfile, time
from pathlib import Path

COLUMNS = ["config", "cfg_text_scale", "timestep_shift", "num_timesteps", "cfg_interval", "items", "seconds"]

def main(argv=None):
    from bagel.eval import EvalSettings, ShapesWorldBench, run
    from bagel.recipe import RecipeConfig, _inferencer
    from bench.common import RESULTS, guided_settings, interval, report, sync
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/shapesworld_gpu.yaml"))
    ap.add_argument("--model-dir", type=Path, default=None, help="the exported model (default: the config's out/model)")
    ap.add_argument("--tasks", nargs="+", default=["t2i"], choices=["t2i", "edit"])
    ap.add_argument("--n", type=int, default=None, help="held-out T2I prompts (edits: n // 2; default: the config's bench_n)")
    ap.add_argument("--cfg-text-scale", type=float, nargs="+", default=None, help="default: the config's")
    ap.add_argument("--timestep-shift", type=float, nargs="+", default=None, help="default: the config's")
    ap.add_argument("--num-timesteps", type=int, nargs="+", default=None, help="default: the config's")
    ap.add_argument("--cfg-interval", type=interval, nargs="+", default=None, metavar="START,END",
                    help="the t range that guidance acts on (t = 1: noise); default: bagel.eval.EvalSettings'")
    ap.add_argument("--per-category", action="store_true", help="also a column per prompt kind / edit kind")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override the run was trained with, as given to `bagel demo --set` (e.g. size=96)")
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default bench/RESULTS.md)")
    a = ap.parse_args(argv)
    cfg = RecipeConfig.from_yaml(a.config, a.set)
    model_dir = a.model_dir or Path(cfg.out) / "model"
    if not (model_dir / "llm_config.json").exists():
        raise FileNotFoundError(f"no exported model at {model_dir}: run `bagel demo --config {a.config}` first, "
                                f"or pass --model-dir")
    inf = _inferencer(model_dir, cfg)
    bench = ShapesWorldBench(n=a.n or cfg.bench_n, seed=cfg.seed, size=cfg.size, tasks=tuple(a.tasks), vit_size=cfg.vit_size)
    d = EvalSettings()
    guided = guided_settings(a.cfg_text_scale or [cfg.cfg_text_scale], a.cfg_interval or [d.cfg_interval])
    grid = itertools.product(guided, a.timestep_shift or [cfg.timestep_shift], a.num_timesteps or [cfg.num_timesteps])
    rows, tags, n_items = [], [], len(bench.items())
    for (scale, span), shift, steps in grid:
        out = Path(tempfile.mkdtemp(prefix="bench_sampling_"))
        settings = {"cfg_text_scale": scale, "timestep_shift": shift, "num_timesteps": steps, "cfg_interval": span}
        try:
            sync(); t0 = time.perf_counter()
            s = run(bench, inf, None, out, settings, verbose=False, batch_size=cfg.eval_batch_size)
            sync(); secs = time.perf_counter() - t0
        finally:
            shutil.rmtree(out, ignore_errors=True)
        m = s["metrics"]
        if not tags: tags = [k for k in m if ("/" not in k or a.per_category) and k != "overall"]
        rows.append([a.config.name, scale, shift, steps, list(span) if scale > 1 else "", n_items, round(secs, 1)]
                    + [round(m.get(k, float("nan")), 3) for k in tags])
        print(rows[-1], flush=True)
    report("ShapesWorld-Bench under sampling settings (one trained model)", COLUMNS + tags, rows,
           notes=f"Model: `{model_dir}`. Each row samples the same held-out items with the same seeds; only the settings "
                 f"above differ. The others are bagel.eval.EvalSettings defaults: image CFG {d.cfg_img_scale}, "
                 f"{d.cfg_renorm_type} renorm.",
           results=a.results or RESULTS)
    return rows

if __name__ == "__main__":
    main()
