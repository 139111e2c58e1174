"""The ShapesWorld recipe's training throughput, split into its two producers: the data pipeline and the device step.

(1) data: packs per second that a DataLoader with `--workers` processes delivers (read parquet/jsonl, decode PNGs,
transform, tokenise, pack), after warm-up; (2) step: seconds per optimizer step of the recipe's model on packs held in
memory (VAE encode + forward_train + backward + clip + AdamW + EMA), after the compile warm-up. Training runs at the
slower of the two, or slower still when both run at once on one host: `--live` times the step as training runs it,
fed by the DataLoader while its workers pack (`--no-pin`: without the pin thread; `--float-pixels`: packs of float32
images, 4x the bytes). `--profile` adds a torch.profiler table of the step (top ops by device and by host time).

    python -m bench.bench_recipe --config configs/shapesworld_gpu.yaml --workers 12          # one GPU
    python -m bench.bench_recipe --config configs/shapesworld_gpu.yaml --tokens 16384          # smaller packs
    python -m bench.bench_recipe --config configs/shapesworld_gpu.yaml --live --steps 150      # beside the workers
    python -m bench.bench_recipe --config configs/shapesworld_cpu.yaml --workers 0 --steps 2  # CPU smoke run
"""
import argparse, itertools, tempfile, time
from dataclasses import replace
from pathlib import Path

import torch

def data_rate(it, workers: int, n: int) -> tuple:  # -> (packs/s, tokens/s, packs)
    "Packs per second from an iterator over the recipe's data pipeline (bagel.recipe.packed_data), after the first pack of each worker."
    t0 = time.perf_counter()
    keep = [next(it) for _ in range(max(1, workers))]
    print(f"  first {len(keep)} packs (worker start-up) in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    got = [next(it) for _ in range(n)]
    dt = time.perf_counter() - t0
    return n / dt, sum(sum(b.sample_lens) for b in got) / dt, keep + got

def step_time(cfg, packs: list, steps: int, profile: bool, sort: bool = True, live=None) -> dict:
    "Seconds per optimizer step over packs held in memory (cycled), or as `live` (a DataLoader) yields them, after 3 warm-up steps."
    from bagel.train import EMA, build_model, make_optimizer, model_config, train_step
    from bagel.distributed import make_mesh
    from bagel.testing import init_random_
    from bagel.vae import AutoEncoder
    from bench.common import sync_sites
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    tcfg, bcfg = cfg.train_config(), cfg.model_config()
    net = build_model(model_config(tcfg, bcfg), tcfg, make_mesh(tcfg.sharding_strategy, 1, None, dev.type), dev)
    net.language_model.model.sort_by_expert = sort           # tokens sorted by expert once per forward, or routed per point
    vae = init_random_(AutoEncoder(bcfg.vae), torch.Generator().manual_seed(0)).to(dev).eval().requires_grad_(False)
    opt, sched = make_optimizer(net, tcfg); ema = EMA(net, tcfg.ema)
    gen = torch.Generator(dev).manual_seed(0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    source, wait = (live if live is not None else itertools.cycle(packs)), [0.0]
    def fresh():                                                       # every step encodes its images, as training does
        t = time.perf_counter(); b = next(source); wait[0] += time.perf_counter() - t
        return replace(b, padded_latent=None)
    t0 = time.perf_counter()
    for i in range(3):
        t1 = time.perf_counter(); train_step(net, opt, sched, ema, [fresh()], tcfg, gen, vae); sync()
        print(f"  warm-up step {i}: {time.perf_counter() - t1:.2f} s", flush=True)
    warm = time.perf_counter() - t0
    t1, wait[0] = time.perf_counter(), 0.0
    for _ in range(steps): train_step(net, opt, sched, ema, [fresh()], tcfg, gen, vae, sync=False)  # as the loop runs
    sync(); dt = (time.perf_counter() - t1) / steps
    data_wait = wait[0] / (dt * steps)
    print(f"step: {dt:.4f} s/step over {steps} steps (no host sync between steps, as in training)", flush=True)
    if cuda: print(f"  host syncs inside one step: {sync_sites(lambda: train_step(net, opt, sched, ema, [fresh()], tcfg, gen, vae, sync=False))}")
    table = None
    if profile:
        from bench.common import op_tables
        def three(): [train_step(net, opt, sched, ema, [fresh()], tcfg, gen, vae) for _ in range(3)]
        table = op_tables(three, ("cuda_time_total", "self_cpu_time_total"), rows=18)
    return dict(step_s=dt, data_wait=data_wait, warmup_s=warm, params=sum(p.numel() for p in net.parameters()), table=table,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)

COLUMNS = ["config", "experts", "model params", "tokens/pack", "samples/pack", "data workers", "data packs/s", "step s",
           "step packs/s", "bound by", "warm-up s", "peak GiB"]

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/shapesworld_gpu.yaml"))
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's num_workers)")
    ap.add_argument("--samples", type=int, default=4000, help="ShapesWorld samples per source to write for the run")
    ap.add_argument("--packs", type=int, default=30, help="packs timed for the data rate")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per pack (expected = max; default: the config's)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--live", action="store_true", help="steps fed by the DataLoader as training runs (its workers packing beside "
                    "the step, this process's threads capped as in training) instead of packs held in memory; use --steps well "
                    "above the prefetched packs (4 per worker)")
    ap.add_argument("--no-pin", action="store_true", help="the DataLoader does not pin packs (on a GPU it does, as training)")
    ap.add_argument("--float-pixels", action="store_true", help="packs carry float32 images and ViT patches (the spec's batch) "
                    "instead of uint8 pixels (as training packs them: a quarter of the bytes)")
    ap.add_argument("--group-tokens", type=int, default=None,
                    help="attn_backend grouped: keys per group (bagel.mot.GROUP_TOKENS; default: chosen per pack)")
    ap.add_argument("--no-sort", action="store_true", help="route tokens per routing point (gathers) instead of sorting them by expert once")
    ap.add_argument("--data-only", action="store_true", help="time the data pipeline only (no model, no table row)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override a config value, as `bagel demo --set` (e.g. train.fused_adamw=true, train.compile=true)")
    ap.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default bench/RESULTS.md)")
    a = ap.parse_args(argv)
    from bagel.checkpoint import load_tokenizer
    from bagel.recipe import RecipeConfig, make_data
    from bagel.testing import write_tiny_tokenizer
    from bench.common import RESULTS, report
    from bagel.distributed import init_distributed, is_dist
    _, world = init_distributed()        # under torchrun (e.g. one process and FULL_SHARD: FSDP2's bf16 parameters)
    cfg = RecipeConfig.from_yaml(a.config, a.overrides)
    if a.group_tokens:
        import bagel.mot
        bagel.mot.GROUP_TOKENS = a.group_tokens
    workers = cfg.num_workers if a.workers is None else a.workers
    out = a.out or Path(tempfile.mkdtemp(prefix="bench_recipe-"))
    cfg = replace(cfg, out=str(out), n_t2i=a.samples, n_edit=a.samples // 2, n_vlm=a.samples, num_workers=workers)
    if a.tokens: cfg = replace(cfg, expected_num_tokens=a.tokens, max_num_tokens=a.tokens)
    t0 = time.perf_counter(); mix = make_data(cfg)
    print(f"data written in {time.perf_counter() - t0:.1f} s ({workers} processes)", flush=True)
    tok = load_tokenizer(write_tiny_tokenizer(out / "tok", vocab_size=cfg.model_config().llm.vocab_size))
    from bagel.recipe import _share_cores, packed_data
    it = iter(packed_data(cfg, mix, tok, pin_memory=False if a.no_pin else None, uint8_pixels=not a.float_pixels))
    dps, tps, packs = data_rate(it, workers, a.packs)
    print(f"data: {dps:.2f} packs/s, {tps:,.0f} tokens/s with {workers} workers", flush=True)
    if a.data_only: return None
    if a.live: _share_cores(workers)       # the same DataLoader goes on feeding the steps, as in training
    s = step_time(cfg, packs[:8], a.steps, a.profile, not a.no_sort, it if a.live else None)
    if s["table"]: print(s["table"])
    spp = 1 / s["step_s"]
    launch = [f"(torchrun, {world} process{'es' * (world > 1)})"] if is_dist() else []
    knobs = [f"--group-tokens {a.group_tokens}"] * bool(a.group_tokens) + ["--no-pin"] * a.no_pin + ["--float-pixels"] * a.float_pixels + [f"--live ({100 * s['data_wait']:.0f}% waiting for data)"] * a.live
    row = [" ".join([a.config.name, *a.overrides, *knobs, *launch]), "routed" if a.no_sort else "sorted", f"{s['params']:,}", cfg.max_num_tokens, round(sum(len(p.sample_lens) for p in packs) / len(packs), 1),
           workers, round(dps, 2), round(s["step_s"], 4), round(spp, 2), "data" if dps < spp else "device",
           round(s["warmup_s"], 1), round(s["peak_gib"], 2)]
    report("ShapesWorld recipe: data pipeline vs device step", COLUMNS, [row],
           notes=f"data: {tps:,.0f} tokens/s from {workers} DataLoader workers (pack incl. a pad when attn_backend is flex); "
                 "step: VAE encode + forward + backward + clip + AdamW + EMA on packs held in memory.",
           results=a.results or RESULTS)
    return row

if __name__ == "__main__":
    main()
