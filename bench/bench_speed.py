"""Issue 10's speed suite at full size: each workload's seconds, its FLOP (or bandwidth) floor, and peak GPU memory.

The BAGEL-7B-MoT layout with random bf16 weights is built directly on the GPU (`bench_generate.build`: no checkpoint),
timed after one warm-up run with the device synchronised. Workloads (the original's defaults):

  t2i1024  text-to-image 1024², 50 timesteps, text CFG 4 on [0.4, 1], shift 3           floor 6.9 s (790 TFLOP/s)
  t2i512   the same at 512²                                                            floor 1.6 s
  edit1024 editing a 1024² image: text CFG 4, image CFG 2 on [0, 1], text_channel        floor 12.2 s
  und      understanding: prefill of a 980² image + question, then greedy decode        decode floor 4.5 ms/token
           (two rows: the plain path and `fast=True`, static KV buffers replayed as a CUDA graph)
  train    one training step at the 7B width on a packed mixed batch (bench_train; 6 layers, no   MFU
           activation checkpointing by default)

Floors are those of the issue (arithmetic at 790 TFLOP/s and 3.35 TB/s). Each run appends one table to RESULTS.md.

    python -m bench.bench_speed                          # every workload
    python -m bench.bench_speed --workloads t2i512 und   # some
    python -m bench.bench_speed --fused                  # with bagel.fast.fuse_ (torch.compile'd elementwise pieces)
"""
import argparse

import torch
from torch import Tensor

from bench.common import timed_peak, timeit

FLOORS = {"t2i1024": 6.9, "t2i512": 1.6, "edit1024": 12.2}   # seconds
DECODE_FLOOR_S = 4.5e-3                                      # seconds per greedy token (und expert weights at 3.35 TB/s)
WORKLOADS = ("t2i1024", "t2i512", "edit1024", "und", "train")

def final_latents(inf, size: int, steps: int, fast: bool) -> Tensor:
    "The sampled latent tokens of one T2I call (the defaults of `t2i`, fixed noise), before the VAE."
    from bench.bench_generate import t2i
    last = {}
    t2i(inf, size, steps, callback=lambda i, n, xs: last.__setitem__("x", xs[0]), fast=fast)
    return last["x"].float().cpu()

def run_generation(inf, name: str, scale: int = 1, steps: int = 50, fast: bool = False) -> list:
    from PIL import Image
    from bench.bench_generate import t2i
    inf.fast = fast                                   # denoising passes as CUDA graph replays (bagel.fast.static_velocity)
    size = (512 if name == "t2i512" else 1024) // scale
    if name.startswith("t2i"):
        fn = lambda: t2i(inf, size, steps)
    else:                                       # the app's edit defaults
        src = Image.new("RGB", (size, size), (120, 80, 40))
        fn = lambda: inf.gen_image("make the plate blue", images=[src], num_timesteps=steps, timestep_shift=3.0,
                                   cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel",
                                   generator=torch.Generator().manual_seed(0), progress=False)
    secs, peak, _ = timed_peak(fn)
    if torch.cuda.is_available() and name == "t2i512" and not fast:   # where the host still waits (look for x49)
        from bench.common import sync_sites
        print(f"  {name}: host syncs in one call: {sync_sites(fn)}", flush=True)
    return [name + (" fast" if fast else ""), f"{size}x{size}", round(secs, 2), FLOORS[name], f"{100 * FLOORS[name] / secs:.0f}%", round(peak, 1)]

def run_understanding(inf, tokens: int, scale: int = 1, fast: bool = False, host_resize: bool = False) -> list:
    from PIL import Image
    inf.fast = fast                                   # decode through bagel.fast.StaticDecoder (CUDA graph)
    inf.resize_on_device = False if host_resize else None   # None: the two bicubic resizes run where the model is
    img = Image.new("RGB", (980 // scale, 980 // scale), (90, 140, 200))
    q = "Describe this picture in detail."
    pre = timeit(lambda: inf.understand(img, q, max_length=1), warmup=2, iters=7)   # median: single calls vary by ~30%
    full, peak, ans = timed_peak(lambda: inf.understand(img, q, max_length=tokens + 1))
    n = max(1, len(ans[0].split()))                   # the bench tokenizer decodes one word per id
    per = (full - pre) / n
    name = ("und fast" if fast else "und") + (" host-resize" if host_resize else "")
    return [name, f"980² + question, {n} tokens", round(pre, 3), f"{per * 1e3:.1f} ms/token ({1 / per:.0f} tokens/s)",
            f"{100 * DECODE_FLOOR_S / per:.0f}%", round(peak, 1)]

def resize_check(device) -> str:
    "Whether `bagel.transforms.resize_bicubic` on `device` gives PIL's pixels for understanding's two resizes."
    import numpy as np
    from PIL import Image
    from bagel.transforms import image_tensor, resize_bicubic
    a = np.random.default_rng(0).integers(0, 256, (980, 980, 3), dtype=np.uint8)
    want = Image.fromarray(a).resize((976, 976), Image.BICUBIC)
    got = resize_bicubic(image_tensor(Image.fromarray(a), device), (976, 976))
    back = resize_bicubic(got, (980, 980))
    same = [np.array_equal(got.permute(1, 2, 0).cpu().numpy(), np.asarray(want)),
            np.array_equal(back.permute(1, 2, 0).cpu().numpy(), np.asarray(want.resize((980, 980), Image.BICUBIC)))]
    return f"resize on {device} equals PIL (980->976, 976->980, random pixels): {same}"

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--tokens", type=int, default=256, help="greedy tokens of the understanding workload")
    ap.add_argument("--layers", type=int, default=6, help="decoder layers of the training step at the 7B width (6 fit an H200 "
                    "without activation checkpointing: 42.0%% MFU, against 31.6%% for 8 with it)")
    ap.add_argument("--ac", action="store_true", help="the training step with activation checkpointing (default off)")
    ap.add_argument("--fused-adamw", action="store_true", help="the training step with torch's fused AdamW")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny model, 1/16 image sides, 4 timesteps")
    ap.add_argument("--results", default=None, help="RESULTS.md to append to (default bench/RESULTS.md)")
    ap.add_argument("--fused", action="store_true", help="compile the elementwise pieces first (bagel.fast.fuse_); rows say 'fused'")
    a = ap.parse_args(argv)
    if not (torch.cuda.is_available() or a.tiny): raise SystemExit("bench_speed needs a CUDA GPU (or --tiny for a smoke run)")
    from pathlib import Path
    from bench.bench_generate import build
    from bench.common import RESULTS, report
    rows, scale, steps = [], (16 if a.tiny else 1), (4 if a.tiny else 50)
    gen = [w for w in a.workloads if w != "train"]
    if gen:
        if a.tiny:
            from bagel.inferencer import Inferencer, default_transforms
            from bagel.model import BagelConfig
            cfg = BagelConfig.tiny()
            inf = build("cpu", torch.float32, cfg)
            inf = Inferencer(inf.bundle, *default_transforms(cfg))
        else: inf = build()
        if a.fused:
            from bagel.fast import fuse_
            fuse_(inf.model)                          # compiles on first use: the warm-up run of each workload pays it
        inf.tokenizer.decode = lambda ids, **kw: " ".join(str(i) for i in ids)   # ids only: one word per token
        for w in gen:
            for fast, host in ((False, True), (False, False), (True, False)) if w == "und" else ((False, False), (True, False)):
                rows.append(run_understanding(inf, a.tokens, scale, fast, host) if w == "und" else run_generation(inf, w, scale, steps, fast))
                if a.fused: rows[-1][0] += " fused"
                print(rows[-1], flush=True)
            if w == "und": print(resize_check(inf.model.device), flush=True)
        if "t2i512" in gen:                           # the fast path's agreement with the plain one, same noise
            size = 512 // scale
            d = (final_latents(inf, size, steps, True) - final_latents(inf, size, steps, False)).abs()
            diff = f"fast vs plain final latent ({size}², same noise): max |diff| {d.max():.3g}, mean {d.mean():.3g}"
            print(diff, flush=True)
        del inf
        if torch.cuda.is_available(): torch.cuda.empty_cache()
    if rows:
        report("speed suite (issue 10): full-size BAGEL-7B-MoT layout, random bf16 weights, plain and fast paths",
               ["workload", "shape", "seconds", "floor (s or ms/token)", "floor / time", "peak GiB"], rows,
               notes="Generation: 50 timesteps, timestep_shift 3, VAE (bf16, GPU) decode included; t2i: text CFG 4 on "
                     "[0.4, 1] (90 decoder passes); edit: text CFG 4, image CFG 2 on [0, 1], text_channel. und: the "
                     "seconds are the prefill (the two bicubic resizes, ViT + context + first token; median of 7 after 2 warm-ups); decode time "
                     "per token after it; `host-resize`: the resizes by PIL on the host, otherwise on the GPU with PIL's pixels "
                     "(bagel.transforms.resize_bicubic); `und fast`: decoding with "
                     "static KV buffers replayed as a CUDA graph; `... fast` generation rows: the denoising passes replayed as "
                     "CUDA graphs (`fast=True`, bagel.fast), captured in the warm-up run and replayed in the timed one (the Inferencer "
                     "keeps them: `inf.graphs`)."
                     + (f" {diff}." if "t2i512" in gen else "")
                     + (" `fused`: RMSNorm, SwiGLU and RoPE compiled (bagel.fast.fuse_; compilation in the warm-up run)." if a.fused else "")
                     + (" SMOKE RUN (--tiny, CPU): the floors do not apply." if a.tiny else ""),
               results=Path(a.results) if a.results else RESULTS)
    if "train" in a.workloads:
        from bench.bench_train import main as train_main
        train_main(["--size", "tiny" if a.tiny else "7b", "--layers", str(a.layers)] + (["--steps", "1"] if a.tiny else [])
                   + ([] if a.ac else ["--no-ac"]) + (["--fused-adamw"] if a.fused_adamw else [])
                   + (["--results", a.results] if a.results else []))

if __name__ == "__main__":
    main()
