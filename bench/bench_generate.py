"""Seconds per image and peak GPU memory of text-to-image at full size (BAGEL-7B-MoT layout, random bf16 weights).

The model is built directly on the GPU (meta device -> `to_empty` -> small random values; the fixed tables and RoPE
frequencies recomputed), so no checkpoint is needed. The VAE is the FLUX one, random, in bf16 on the GPU. Timing is
after one warm-up image, device synchronised; `--steps` sets `num_timesteps` (50: 49 model calls). `--quant` runs
each listed mode (bagel.quant: bf16, nf4, int8; needs bitsandbytes) on a freshly built model, quantised on the GPU.

    python -m bench.bench_generate --sizes 512 1024 --steps 50
    python -m bench.bench_generate --sizes 1024 --quant bf16 nf4 int8
    python -m bench.bench_generate --sizes 1024 --quant nf4 --skip original --double-quant --embeddings --low-memory-decode
"""
import argparse, time

import torch

def build(device="cuda", dtype=torch.bfloat16, cfg=None):
    "Full-size Bagel + VAE with random weights on `device`, and an Inferencer over them."
    from types import SimpleNamespace
    from bagel.checkpoint import BagelBundle
    from bagel.inferencer import Inferencer
    from bagel.distributed import recompute_fixed_
    from bagel.model import Bagel, BagelConfig
    from bagel.vae import AutoEncoder
    cfg = cfg or BagelConfig.bagel_7b_mot()
    with torch.device("meta"): model, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    model, vae = model.to_empty(device=device), vae.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for m in (model, vae):
            for n, p in m.named_parameters():
                if p.ndim == 1: p.copy_(1 + 0.05 * torch.randn(p.shape, generator=g, device=device)) if "norm" in n else p.normal_(0, 0.02, generator=g)
                else: p.normal_(0, 1 / p[0].numel() ** 0.5, generator=g)
    recompute_fixed_(model)                                  # sin-cos tables and RoPE frequencies, as loading does
    model, vae = model.to(dtype).eval(), vae.to(dtype).eval()
    V = min(cfg.llm.vocab_size, 5000)
    tok = SimpleNamespace(encode=lambda s: [16 + ord(c) % (V - 16) for c in s])   # ids only: no tokenizer needed
    return Inferencer(BagelBundle(model, vae, tok, cfg))

PROMPT = "a photo of a bagel on a red plate, studio light"

def t2i(inf, size: int, steps: int = 50, **kw) -> list:  # kw: more gen_image arguments (callback, fast, ...)
    "One text-to-image call with the original app's T2I defaults (text CFG 4 on [0.4, 1], shift 3, no image CFG)."
    return inf.gen_image(PROMPT, image_shapes=(size, size), num_timesteps=steps, cfg_text_scale=4.0, cfg_img_scale=1.0,
                         cfg_interval=(0.4, 1.0), timestep_shift=3.0, generator=torch.Generator().manual_seed(0), progress=False,
                         **kw)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--quant", nargs="+", choices=["bf16", "nf4", "int8"], default=None,
                    help="quantisation modes to measure (bagel.quant.quantize_); default: plain bf16")
    ap.add_argument("--skip", choices=["default", "original"], default="default",
                    help="modules kept in bf16: bagel.quant.DEFAULT_SKIP, or none as in the original app (ORIGINAL_SKIP)")
    ap.add_argument("--double-quant", action="store_true", help="NF4 block scales in 8 bits (quantize_(double_quant=True))")
    ap.add_argument("--embeddings", action="store_true", help="quantise the token table too (quantize_(embeddings=True))")
    ap.add_argument("--low-memory-decode", action="store_true",
                    help="VAE decode in strips at every size (Inferencer(low_memory_decode=True); default: above 512² only)")
    ap.add_argument("--profile", action="store_true", help="print the op table of one generation at the first size (no row)")
    ap.add_argument("--fast", action="store_true", help="with --profile: the denoising passes as CUDA graph replays (fast=True)")
    ap.add_argument("--fused", action="store_true", help="with --profile: RMSNorm, SwiGLU and RoPE compiled (bagel.fast.fuse_)")
    a = ap.parse_args()
    if a.quant: return main_quant(a)
    if (a.fast or a.fused) and not a.profile: raise SystemExit("--fast and --fused go with --profile; bench_speed times those paths")
    from bench.common import report, timed_peak
    inf = build()
    if a.fused:
        from bagel.fast import fuse_
        fuse_(inf.model)
    inf.fast = a.fast
    if a.profile: return profile(inf, a.sizes[0], a.steps)
    rows = []
    for size in a.sizes:
        secs, peak, _ = timed_peak(lambda: t2i(inf, size, a.steps))
        rows.append([f"{size}x{size}", a.steps, round(secs, 2), round(peak, 1)])
    report("text-to-image, BAGEL-7B-MoT layout, random bf16 weights, plain path (sdpa per sequence; the CFG branches packed in one forward per step)",
           ["size", "timesteps", "s / image", "peak GiB"], rows,
           notes="cfg_text_scale 4 on [0.4, 1], timestep_shift 3, text guidance only (cfg_img_scale 1); VAE decode included.")

def profile(inf, size: int, steps: int):
    "The ops of one text-to-image call (after a warm-up one), by device time."
    from bench.common import op_tables, sync
    t2i(inf, size, steps); sync()
    secs = {}
    def run():
        t0 = time.perf_counter(); t2i(inf, size, steps); sync(); secs["wall"] = time.perf_counter() - t0
    print(op_tables(run, sorts=("self_cuda_time_total", "self_cpu_time_total"), rows=30))
    print(f"one {size}x{size} image ({steps} timesteps): {secs['wall']:.2f} s wall under the profiler; "
          "the device and host totals are the table's last two lines")

def main_quant(a):
    "One table: seconds per image, resident weights and peak memory per quantisation mode and size."
    import gc
    from bench.common import report, timed_peak
    from bagel.quant import quantize_, module_bytes, DEFAULT_SKIP, ORIGINAL_SKIP
    skip = DEFAULT_SKIP if a.skip == "default" else ORIGINAL_SKIP
    GiB, rows = 2**30, []
    for mode in a.quant:
        inf = build()
        quantize_(inf.model, mode, skip=skip, double_quant=a.double_quant, embeddings=a.embeddings)
        inf.low_memory_decode = True if a.low_memory_decode else None   # None: the library's default (strips above 512²)
        gc.collect(); torch.cuda.empty_cache()
        weights = module_bytes(inf.model) / GiB
        peaks = {}
        decode = inf.decode_latents
        def split(x, shape):  # the peak of the denoising loop, then that of the VAE decode
            peaks["denoise"] = torch.cuda.max_memory_allocated(); torch.cuda.reset_peak_memory_stats()
            out = decode(x, shape); peaks["decode"] = torch.cuda.max_memory_allocated(); return out
        inf.decode_latents = split
        for size in a.sizes:
            secs, _, _ = timed_peak(lambda: t2i(inf, size, a.steps))   # the peaks: split around the decode above
            rows.append([mode, f"{size}x{size}", a.steps, round(secs, 2), round(weights, 2), round(peaks["denoise"] / GiB, 2),
                         round(peaks["decode"] / GiB, 2), round(max(peaks.values()) / GiB, 2)])
        del inf, split, decode; gc.collect(); torch.cuda.empty_cache()
    extra = "".join(f", {k}" for k, v in (("double_quant", a.double_quant), ("embeddings", a.embeddings),
                                           ("low_memory_decode", a.low_memory_decode)) if v)
    report("text-to-image per quantisation mode, BAGEL-7B-MoT layout, random weights "
           f"(bagel.quant {a.skip} skip list{extra})",
           ["mode", "size", "timesteps", "s / image", "weights GiB", "peak denoising GiB", "peak VAE decode GiB", "peak GiB"],
           rows, notes="cfg_text_scale 4 on [0.4, 1], timestep_shift 3, cfg_img_scale 1; VAE (bf16, GPU) decode included; "
                       "compare with bagel.quant.plan_memory.")

if __name__ == "__main__":
    main()
