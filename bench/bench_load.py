"""Load time and peak host/GPU memory of `from_pretrained` on a full-size BAGEL-7B-MoT model dir.

The model dir is written first with random bf16 weights in the official layout (same names, shapes and files as
the release; the tokenizer is bagel's tiny one, which does not change the load). The load then runs in a fresh
process so its peak host memory (ru_maxrss) is its own.

    python -m bench.bench_load --dir /tmp/bagel7b [--layers 28] [--device cuda]
"""
import argparse, json, os, resource, subprocess, sys, time
from dataclasses import replace
from pathlib import Path

import torch

def write_model_dir(d: Path, layers: int):
    "Random bf16 weights for the 7B config (optionally fewer layers), written with the project's own writer."
    from bagel.checkpoint import save_file_atomic, LLM_CONFIG, VIT_CONFIG, WEIGHTS, AE_WEIGHTS
    from bagel.model import Bagel, BagelConfig
    from bagel.testing import write_tiny_tokenizer
    from bagel.vae import AutoEncoder
    cfg = BagelConfig.bagel_7b_mot()
    cfg = replace(cfg, llm=replace(cfg.llm, num_hidden_layers=layers))
    d.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(d)
    (d / LLM_CONFIG).write_text(json.dumps(cfg.llm.to_dict()))
    (d / VIT_CONFIG).write_text(json.dumps(replace(cfg.vit, num_hidden_layers=cfg.vit.num_hidden_layers + 1).to_dict()))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        model, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    for m, f, dtype in [(model, WEIGHTS, torch.bfloat16), (vae, AE_WEIGHTS, torch.float32)]:
        sd = {k: (torch.randn(v.shape, device=dev, dtype=dtype) * 0.02).cpu() for k, v in m.state_dict().items()}
        save_file_atomic(sd, d / f)
        del sd

def _rss_anon_gib() -> float:
    "Anonymous resident memory of this process (private copies; excludes mmap'd file pages)."
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"): return int(line.split()[1]) / 2**20
    return float("nan")

def load_once(d: str, device: str) -> dict:
    "Time from_pretrained in this process; report peak host RSS (all, and anonymous only) and peak GPU memory."
    import threading
    from bagel.checkpoint import from_pretrained
    if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
    peak, done = [_rss_anon_gib()], threading.Event()
    def sample():
        while not done.wait(0.02): peak.append(_rss_anon_gib())
    th = threading.Thread(target=sample, daemon=True); th.start()
    t0 = time.perf_counter()
    b = from_pretrained(d, dtype=torch.bfloat16, device=device)
    if torch.cuda.is_available(): torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    done.set(); th.join()
    n = sum(p.numel() for p in b.model.parameters())
    return {"seconds": secs, "params": n, "peak_anon_gib": max(peak),
            "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/bagel7b"); ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(load_once(a.dir, a.device))); return
    from bench.common import report
    d = Path(a.dir)
    t0 = time.perf_counter(); write_model_dir(d, a.layers); t_write = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in d.iterdir()) / 2**30
    rows = []
    for label in ["first load", "second load"]:
        out = subprocess.run([sys.executable, "-m", "bench.bench_load", "--child", "--dir", str(d), "--device", a.device],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([label, f"{r['params']:,}", round(size, 2), round(r["seconds"], 1), round(size / r["seconds"], 2),
                     round(r["peak_host_gib"], 2), round(r["peak_anon_gib"], 2), round(r["peak_gpu_gib"], 2)])
    report(f"from_pretrained, BAGEL-7B-MoT layout ({a.layers} layers), random bf16 weights -> {a.device}",
           ["run", "parameters", "dir GiB", "load s", "GiB/s", "peak RSS GiB", "peak anon RSS GiB", "peak GPU GiB"], rows,
           notes=f"Model dir written in {t_write:.0f} s just before, so both loads read from the page cache. Peak RSS "
                 f"(ru_maxrss) counts the safetensors file pages mapped while reading; peak anonymous RSS (sampled "
                 f"every 20 ms from /proc/self/status) is the memory the process itself allocated (Python, torch, CUDA "
                 f"context, staging), i.e. whether a second host copy of the weights was made.")

if __name__ == "__main__":
    main()
