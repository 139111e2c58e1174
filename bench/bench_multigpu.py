"""Multi-GPU inference at full size (BAGEL-7B-MoT layout, random bf16 weights): weights and peak memory per GPU of
the layer split, and seconds per image of CFG-parallel (one CFG branch per GPU) against one GPU.

The model is built on the meta device and materialised where it runs (`split_layers_` allocates each layer on its
GPU; CFG-parallel builds one replica per rank with `bench.bench_generate.build`), so no checkpoint is needed.
Text-to-image, `num_timesteps` 50, shift 3, cfg_text_scale 4 on (0.4, 1]; VAE decode included; the median of `--iters`
images (default 3) after one warm-up, devices synchronised.

    python -m bench.bench_multigpu split --gpus 1 2 --size 1024
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 2 -m bench.bench_multigpu cfg --size 1024
"""
import argparse

import torch

PROMPT = "a photo of a bagel on a red plate, studio light"

def random_init_(model, seed: int = 0):
    "Small random values in place, on whatever device each tensor lives; fixed tables recomputed."
    from bagel.distributed import recompute_fixed_
    gens = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            g = gens.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
            if p.ndim == 1: p.normal_(1 if "norm" in n else 0, 0.05 if "norm" in n else 0.02, generator=g)
            else: p.normal_(0, 1 / p[0].numel() ** 0.5, generator=g)
    recompute_fixed_(model)
    return model

def split_inferencer(gpus: int, dtype=torch.bfloat16):
    "Bagel split over cuda:0..gpus-1 (meta -> each part allocated on its GPU), the VAE on cuda:0."
    from types import SimpleNamespace
    from bagel.checkpoint import BagelBundle
    from bagel.inferencer import Inferencer
    from bagel.model import Bagel, BagelConfig
    from bagel.multigpu import split_layers_
    from bagel.vae import AutoEncoder
    cfg = BagelConfig.bagel_7b_mot()
    with torch.device("meta"): model, vae = Bagel(cfg).to(dtype), AutoEncoder(cfg.vae).to(dtype)
    plan = split_layers_(model, [f"cuda:{i}" for i in range(gpus)])
    random_init_(model.eval())
    vae = random_init_(vae.to_empty(device="cuda:0").eval())
    V = min(cfg.llm.vocab_size, 5000)
    tok = SimpleNamespace(encode=lambda s: [16 + ord(c) % (V - 16) for c in s])
    return Inferencer(BagelBundle(model, vae, tok, cfg)), plan

def t2i(inf, size, steps, cfg_img_scale, parallel=False):
    "One text-to-image call (plain or CFG-parallel), seed 0."
    from bagel.multigpu import gen_image_cfg_parallel
    from bagel.sampling import SamplingConfig
    g = torch.Generator().manual_seed(0)
    if parallel:
        return gen_image_cfg_parallel(inf, [PROMPT], image_shapes=(size, size), cfg_text_scale=4.0, cfg_img_scale=cfg_img_scale,
                                      sampling=SamplingConfig(num_timesteps=steps), generator=g)
    return inf.gen_image(PROMPT, image_shapes=(size, size), num_timesteps=steps, cfg_text_scale=4.0,
                         cfg_img_scale=cfg_img_scale, generator=g, progress=False)

def timed(fn, iters: int = 3) -> float:
    "Median seconds of `fn()` after one warm-up call (every rank must call it alike: it runs collectives)."
    from bench.common import timeit
    return timeit(fn, warmup=1, iters=iters)

def bench_split(a):
    from bench.common import report
    rows = []
    for n in a.gpus:
        inf, plan = split_inferencer(n)
        for i in range(n): torch.cuda.reset_peak_memory_stats(i)
        secs = timed(lambda: t2i(inf, a.size, a.steps, 1.0), a.iters)
        for d in range(n):
            ls = plan.layers_on(d)
            rows.append([n, f"cuda:{d}", f"{ls[0]}-{ls[-1]}" if ls else "none", round(plan.nbytes[d] / 2**30, 2),
                         round(torch.cuda.max_memory_allocated(d) / 2**30, 2), round(secs, 2)])
        del inf; torch.cuda.empty_cache()
    report(f"layer split, BAGEL-7B-MoT layout, random bf16 weights, {a.size}x{a.size} text-to-image, {a.steps} timesteps",
           ["GPUs", "device", "decoder layers", "weights GiB", "peak GiB", "s / image"], rows,
           notes="Home device (cuda:0): embeddings, ViT, connector, time embedder, vae2llm/llm2vae, final norms, lm_head, "
                 "and the VAE. cfg_text_scale 4 on [0.4, 1], cfg_img_scale 1 (two branches), VAE decode included.")

def bench_cfg(a):
    import torch.distributed as dist
    from bagel.distributed import init_distributed
    from bench.bench_generate import build
    from bench.common import report
    rank, world = init_distributed()
    inf = build(device=f"cuda:{torch.cuda.current_device()}")
    rows = []
    for s_img in a.img_scales:
        branches = 2 if s_img <= 1 else 3
        one = None
        if rank == 0: one = timed(lambda: t2i(inf, a.size, a.steps, s_img), a.iters)       # plain path, one GPU
        dist.barrier(); torch.cuda.reset_peak_memory_stats()
        par = timed(lambda: t2i(inf, a.size, a.steps, s_img, parallel=True), a.iters)
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if rank == 0: rows.append([branches, world, round(one, 2), round(par, 2), round(one / par, 2), round(peak.item(), 1)])
    if rank == 0:
        report(f"CFG-parallel, BAGEL-7B-MoT layout, random bf16 weights, {a.size}x{a.size} text-to-image, {a.steps} timesteps",
               ["CFG branches", "ranks", "1 GPU s / image", "CFG-parallel s / image", "speed-up", "peak GiB per GPU"], rows,
               notes="One process per GPU (NCCL, NCCL_NVLS_ENABLE=0), a full replica each; cfg_text_scale 4 on [0.4, 1] "
                     "(only `cond` runs outside it), timestep_shift 3; VAE decode included on every rank.")
    dist.destroy_process_group()

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["split", "cfg"])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="split: device counts to measure")
    ap.add_argument("--img_scales", type=float, nargs="+", default=[1.0, 1.5], help="cfg: cfg_img_scale values (1: 2 branches)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--iters", type=int, default=3, help="timed images after the warm-up (the median is reported)")
    a = ap.parse_args()
    bench_split(a) if a.mode == "split" else bench_cfg(a)

if __name__ == "__main__":
    main()
