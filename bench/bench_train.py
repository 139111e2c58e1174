"""Training throughput: tokens/s, TFLOPs and MFU (spec §5.8 accounting) of full optimizer steps on a packed mixed batch.

One step = VAE-free packed batch (latents given) -> forward_train -> losses -> backward -> clip -> AdamW -> EMA, timed
with the device synchronised. The pack mixes VLM samples (a ViT image + an answer, CE loss) and T2I samples (a caption
+ a noisy latent, MSE loss). Sizes: `7b` is BAGEL-7B-MoT's width (H 3584, I 18944, 28 heads, the full ViT) with
`--layers` decoder layers (as many as fit one GPU with AdamW + EMA state: about 9 GB per MoT layer); `tiny` is the
test model. Alone it runs without a process group; under torchrun each rank is timed and FSDP2 shards the model.

    python -m bench.bench_train --size 7b --layers 8        # one H100/H200
    python -m bench.bench_train --size tiny --steps 3       # CPU smoke run
"""
import argparse, time
from dataclasses import replace
from pathlib import Path

import torch

def concat_packed(batches: list):
    "Pack several PackedBatch records back to back into one (indexes shifted; latents must share one padded size)."
    from bagel.model import PackedBatch
    out, off = {}, 0
    shift = ("packed_text_indexes", "packed_vit_token_indexes", "packed_vae_token_indexes", "mse_loss_indexes", "ce_loss_indexes")
    cat = ("packed_text_ids", "packed_position_ids", "packed_vit_tokens", "packed_vit_position_ids", "vit_token_seqlens",
           "padded_latent", "packed_latent_position_ids", "packed_timesteps", "packed_label_ids")
    for b in batches:
        for k in shift: out.setdefault(k, []).append(getattr(b, k) + off)
        for k in cat: out.setdefault(k, []).append(getattr(b, k))
        for k in ("sample_lens", "split_lens", "attn_modes", "patchified_vae_latent_shapes"): out.setdefault(k, []).extend(getattr(b, k))
        off += b.sequence_length
    return PackedBatch(sequence_length=off, **{k: torch.cat(v) if k in shift + cat else v for k, v in out.items()})

def mixed_batch(cfg, pairs: int, vit_px: int, latent_tokens: int, text_len: int, seed: int = 0):
    "`pairs` x ([ViT image, answer] + [caption, noisy latent]) packed into one sequence."
    from types import SimpleNamespace
    from bagel.testing import toy_packed_batch
    g = torch.Generator().manual_seed(seed)
    V, C = cfg.llm.vocab_size, cfg.vae.z_channels
    ids = lambda: torch.randint(16, min(V, 150000), (text_len,), generator=g).tolist()
    bs = [toy_packed_batch(SimpleNamespace(config=cfg), ids(), ids(), torch.rand(3, vit_px, vit_px, generator=g) * 2 - 1,
                           torch.randn(C, 2 * latent_tokens, 2 * latent_tokens, generator=g), float(torch.randn((), generator=g)))
          for _ in range(pairs)]
    return concat_packed(bs)

def bench(size: str, layers: int, steps: int, pairs: int, attn: str, activation_checkpointing: bool,
          profile: bool = False, fused_adamw: bool = False, sort: bool = True) -> dict:
    "Time `steps` optimizer steps after 2 warm-up steps; returns the figures of one table row."
    from bagel.distributed import get_world_size, init_distributed, make_mesh
    from bagel.model import BagelConfig
    from bagel.train import EMA, TrainConfig, build_model, detect_peak_tflops, make_optimizer, model_config, train_flops, train_step
    rank, W = init_distributed()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if size == "7b":
        base = BagelConfig.bagel_7b_mot(); base = replace(base, llm=replace(base.llm, num_hidden_layers=layers))
        shape = dict(vit_px=378, latent_tokens=32, text_len=512)
    else:
        base = BagelConfig.tiny(); shape = dict(vit_px=16, latent_tokens=4, text_len=24)
    cfg = TrainConfig(mixed_precision="bf16" if cuda else "fp32", activation_checkpointing=activation_checkpointing,
                      warmup_steps=0, attn_backend=attn, num_shard=None, progress=False, fused_adamw=fused_adamw)
    net = build_model(model_config(cfg, base), cfg, make_mesh(cfg.sharding_strategy, 1, None, dev.type), dev)
    net.language_model.model.sort_by_expert = sort           # tokens sorted by expert once per forward, or routed per point
    opt, sched = make_optimizer(net, cfg); ema = EMA(net, cfg.ema)
    batch = mixed_batch(net.config, pairs, **shape, seed=rank)
    gen = torch.Generator(dev).manual_seed(rank)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2): train_step(net, opt, sched, ema, [batch], cfg, gen)
    if cuda: torch.cuda.reset_peak_memory_stats()
    sync(); t0 = time.perf_counter()
    for _ in range(steps): rec = train_step(net, opt, sched, ema, [batch], cfg, gen)
    sync(); dt = (time.perf_counter() - t0) / steps
    if profile:                                   # where one step's device time goes
        from bench.common import op_tables
        print(op_tables(lambda: train_step(net, opt, sched, ema, [batch], cfg, gen), ("cuda_time_total",)), flush=True)
    # (a DTensor's numel is the global one, so the parameter count below is the whole model's on any number of ranks)
    toks, sq = batch.sequence_length, sum(n * n for n in batch.sample_lens)
    tflops = train_flops(net.config.llm, toks, sq) / dt / 1e12            # per rank
    peak = detect_peak_tflops()
    return dict(size=size, layers=net.config.llm.num_hidden_layers, world=get_world_size(), attn=attn,
                ac=activation_checkpointing, adamw="fused" if fused_adamw else "foreach", order="sorted" if sort else "routed", tokens=toks, samples=len(batch.sample_lens),
                params=sum(p.numel() for p in net.parameters()), step_s=dt, tokens_per_s=toks / dt * W,
                tflops=tflops, mfu=tflops / peak if peak else 0.0, loss=rec["loss"],
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)

COLUMNS = ["size", "layers", "ranks", "attention", "act. ckpt", "AdamW", "experts", "tokens/pack", "samples", "parameters", "s/step",
           "tokens/s", "TFLOPs/rank", "MFU", "peak GiB"]

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["7b", "tiny"], nargs="+", default=["7b", "tiny"])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers at the 7B width (28 in the real model)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=6, help="VLM + T2I sample pairs per pack (7b: ~2.8k tokens each)")
    ap.add_argument("--attn", choices=["sdpa", "flex", "grouped"], default="grouped" if torch.cuda.is_available() else "sdpa",
                    help="GPU default grouped: 32.3%% MFU at 8 layers on an H200 (25b2c70); flex had 25.5%% (e6f73d6; bench/RESULTS.md)")
    ap.add_argument("--no-ac", action="store_true", help="turn activation checkpointing off")
    ap.add_argument("--fused-adamw", action="store_true", help="AdamW as torch's fused kernel (TrainConfig.fused_adamw)")
    ap.add_argument("--no-sort", action="store_true", help="route tokens per routing point (gathers) instead of sorting them by expert once")
    ap.add_argument("--profile", action="store_true", help="print a profiler table of one step")
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default bench/RESULTS.md)")
    a = ap.parse_args(argv)
    from bench.common import RESULTS, report
    rows = []
    for s in a.size:
        r = bench(s, a.layers, a.steps, a.pairs, a.attn, not a.no_ac, a.profile, a.fused_adamw, not a.no_sort)
        rows.append([r["size"], r["layers"], r["world"], r["attn"], r["ac"], r["adamw"], r["order"], r["tokens"], r["samples"], f"{r['params']:,}",
                     round(r["step_s"], 3), round(r["tokens_per_s"], 1), round(r["tflops"], 2), f"{100 * r['mfu']:.1f}%",
                     round(r["peak_gib"], 1)])
    from bagel.distributed import get_rank
    if get_rank() == 0:
        report("training step (forward + backward + clip + AdamW + EMA) on a packed VLM + T2I batch", COLUMNS, rows,
               notes="MFU = (6 N_dense tokens + 12 hd h L sum(len^2)) / time / peak (spec §5.8), per rank; bf16 on GPU, "
                     "fp32 on CPU; the VAE is not run (latents are given).", results=a.results or RESULTS)
    return rows

if __name__ == "__main__":
    main()
