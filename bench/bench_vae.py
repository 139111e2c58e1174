"""The recipe VAE's quality against its training: reconstruction MSE and the judge's round-trip ceiling.

For each `--steps` value, a fresh VAE of the recipe config is trained (`bagel.vae_train.train_vae`, its one-cycle
schedule over that many steps) and scored with `bagel.recipe.vae_ceiling`: the share of held-out scenes the judge
still reads exactly after encode -> decode. Every generated or edited image leaves through this decoder, so the
ceiling bounds what the T2I and edit scores can show. Appends one table to RESULTS.md.

    python -m bench.bench_vae --config configs/shapesworld_gpu.yaml --steps 1000 2000 4000      # one GPU
    python -m bench.bench_vae --steps 2000 --vae-ch 32 64 --save vaes/      # two widths; keep each VAE for `vae_weights:`
    python -m bench.bench_vae --config configs/shapesworld_cpu.yaml --steps 250 --n 24          # CPU
    python -m bench.bench_vae --weights assets/shapesworld_vae_64px.safetensors --n 600         # a trained VAE, per category
    python -m bench.bench_vae --weights assets/shapesworld_vae_64px.safetensors --set size=96   # the same VAE on 96 px renders
    python -m bench.bench_vae --init assets/shapesworld_vae_64px.safetensors --lr 3e-4 --steps 100 --set size=96 --save DIR

`--weights` trains nothing: it scores a saved VAE per category of the benchmark's tasks, each with that task's own
judge (a T2I prompt's spec on the round-tripped render of its held-out scene; an edit's check on the round-tripped
target), so a category's ceiling is what a perfect generator could score through this decoder.
"""
import argparse, dataclasses, time
from pathlib import Path

import torch

COLUMNS = ["config", "VAE width (ch)", "VAE steps", "batch", "seconds", "recon MSE (last 10 steps)", "held-out scenes", "read exactly"]

def bench(cfg, steps: int, batch_size: int, n: int, save: Path | None = None,
          init: Path | None = None, lr: float | None = None) -> list:   # init: fine-tune that VAE instead of a fresh one
    from bagel.checkpoint import save_file_atomic
    from bagel.recipe import _load_vae, train_recipe_vae, vae_ceiling
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t0 = time.perf_counter()
    start = _load_vae(cfg, init.parent, name=init.name) if init else None
    vae, hist = train_recipe_vae(cfg, steps, batch_size, log=None, init=start, lr=lr)
    sync(); secs = time.perf_counter() - t0
    recon = sum(r for _, r, _ in hist[-10:]) / len(hist[-10:])
    if save:                                  # usable as the recipe's `vae_weights:` (same `model: vae:` config)
        save.mkdir(parents=True, exist_ok=True)
        save_file_atomic({k: v.cpu() for k, v in vae.state_dict().items()}, save / f"ae_ch{cfg.model_config().vae.ch}_{steps}.safetensors")
    return [cfg.model_config().vae.ch, steps, batch_size, round(secs, 1), round(recon, 4), n, round(vae_ceiling(cfg, vae, n), 3)]

@torch.no_grad()
def task_ceilings(cfg, vae, n: int) -> list:  # -> rows [task, category, items, accepted]
    "Per T2I category and edit operation: the share of `n` held-out T2I items (n // 2 edits) whose target, encoded and decoded, its judge accepts."
    from collections import Counter
    from bagel.recipe import round_trip_images, vae_round_trip
    from bagel.shapesworld import heldout, score_edit, score_t2i
    rows = []
    for task, items, key, ok, scene in (
            ("t2i", list(heldout(n, "t2i", seed=cfg.seed)), lambda x: x["spec"]["tag"],
             lambda x, im: score_t2i(x["spec"], im), lambda x: x["scene"]),
            ("edit", list(heldout(n // 2, "edit", seed=cfg.seed)), lambda x: x["spec"]["op"],
             lambda x, im: score_edit(x["source"], x["spec"], im), lambda x: x["target"])):
        seen, good = Counter(), Counter()
        for x, im in zip(items, round_trip_images(vae_round_trip(vae), [scene(x) for x in items], cfg.size)):
            seen[key(x)] += 1; good[key(x)] += bool(ok(x, im))
        rows += [[task, c, seen[c], round(good[c] / seen[c], 3)] for c in sorted(seen)]
        rows.append([task, "all", sum(seen.values()), round(sum(good.values()) / sum(seen.values()), 3)])
    return rows

def main(argv=None):
    from bagel.recipe import RecipeConfig
    from bench.common import RESULTS, report
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/shapesworld_gpu.yaml"))
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="VAE training steps, one fresh VAE each (default: the config's)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's vae_batch_size")
    ap.add_argument("--vae-ch", type=int, nargs="+", default=None,
                    help="VAE base widths to compare (`model: vae: ch`; default: the config's)")
    ap.add_argument("--save", type=Path, default=None, help="write each VAE as SAVE/ae_ch<ch>_<steps>.safetensors")
    ap.add_argument("--n", type=int, default=None, help="held-out scenes judged (default: the config's bench_n)")
    ap.add_argument("--weights", type=Path, default=None,
                    help="score this saved VAE (the recipe's VAE config) per task category instead of training any")
    ap.add_argument("--init", type=Path, default=None,
                    help="fine-tune this saved VAE (bench_vae --save, or the recipe's vae_weights) instead of a fresh one")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate with --init (default: the trainer's 2e-3)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="recipe config override, as `bagel demo --set` (e.g. size=96: the scenes rendered at 96 px)")
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default bench/RESULTS.md)")
    a = ap.parse_args(argv)
    if a.lr is not None and a.init is None: ap.error("--lr applies to --init (a fresh VAE trains at the recipe's rate)")
    cfg = RecipeConfig.from_yaml(a.config, a.overrides)
    name = " ".join([a.config.name, *a.overrides, *([f"from {a.init.name}" + (f" at lr {a.lr:g}" if a.lr else "")] if a.init else [])])
    bs, n = a.batch_size or cfg.vae_batch_size, a.n or cfg.bench_n
    if a.weights:
        from bagel.recipe import _load_vae
        if not a.weights.is_file(): raise FileNotFoundError(f"no VAE file at {a.weights}: pass a .safetensors that bench_vae --save wrote")
        rows = task_ceilings(cfg, _load_vae(cfg, a.weights.parent, name=a.weights.name), n)
        report(f"ShapesWorld VAE round trip per task category ({a.weights.name}, {name})",
               ["task", "category", "held-out items", "accepted by its judge"], rows,
               notes="Each held-out T2I item's scene and each edit's target is rendered, encoded and decoded (mean latent), "
                     "and judged as a generated image would be: the ceiling a perfect generator reaches through this decoder.",
               results=a.results or RESULTS)
        return rows
    rows = []
    for ch in a.vae_ch or [cfg.model_config().vae.ch]:
        c = dataclasses.replace(cfg, model={**cfg.model, "vae": {**cfg.model.get("vae", {}), "ch": ch}})
        for s in a.steps or [cfg.vae_steps]:
            rows.append([name] + bench(c, s, bs, n, a.save, a.init, a.lr))
            print(rows[-1], flush=True)
    report("ShapesWorld VAE: training steps against the judge's round-trip ceiling", ["config"] + COLUMNS[1:], rows,
           notes=("Each row fine-tunes the `--init` VAE at the config's size" if a.init else "Each row trains a fresh VAE") +
                 " (one-cycle schedule over its steps, seeded as the recipe) and encodes -> "
                 "decodes held-out renders; `read exactly`: the share the judge reads with every object and the background "
                 "right (bagel.recipe.vae_ceiling), a ceiling on the T2I and edit scores of a model using this VAE.",
           results=a.results or RESULTS)
    return rows

if __name__ == "__main__":
    main()
