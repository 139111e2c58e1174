"""Profiler traces of understanding prefill and one text-to-image call at full size (random bf16 weights, `fuse_`).

Prints the sorted times of 7 prefills (980² image + question, first token) and of 2 T2I calls, then, for one more
of each, the op table by device time, and writes the Chrome traces (gzipped) to `--out` for a timeline: the inferencer's
phases (`P:extend_vit`, `P:vit_forward`, `P:extend_text`, `P:gen_text`, `P:decode_latents`) are labelled ranges.

    python -m bench.trace_inference --size 1024 --out traces/
"""
import argparse
from pathlib import Path

import torch

def labelled(obj, name: str, label: str):
    "Wrap `obj.name` so each call is a profiler range called `label`."
    from torch.profiler import record_function
    f = getattr(obj, name)
    def g(*a, **k):
        with record_function(label): return f(*a, **k)
    setattr(obj, name, g)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="T2I image side (0: prefill only)")
    ap.add_argument("--out", type=Path, default=Path("traces"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available(): raise SystemExit("trace_inference needs a CUDA GPU")
    from PIL import Image
    from bagel.fast import fuse_
    from bench.bench_generate import build, t2i
    from bench.common import op_tables, times
    a.out.mkdir(parents=True, exist_ok=True)
    inf = build(); fuse_(inf.model)
    inf.tokenizer.decode = lambda ids, **kw: " ".join(str(i) for i in ids)
    m = inf.model
    for obj, name in ((m, "extend_vit"), (m, "extend_text"), (inf, "gen_text"), (inf, "decode_latents")): labelled(obj, name, f"P:{name}")
    labelled(m.vit_model, "forward", "P:vit_forward")
    img = Image.new("RGB", (980, 980), (90, 140, 200))
    prefill = lambda: inf.understand(img, "Describe this picture in detail.", max_length=1)
    print("prefill s (7, sorted):", [round(x, 4) for x in times(prefill, warmup=2, iters=7)], flush=True)
    print(op_tables(prefill, trace=a.out / "prefill.json.gz"), flush=True)
    if a.size:
        print(f"t2i {a.size} s (2, sorted):", [round(x, 3) for x in times(lambda: t2i(inf, a.size), warmup=1, iters=2)], flush=True)
        print(op_tables(lambda: t2i(inf, a.size), trace=a.out / f"t2i{a.size}.json.gz"), flush=True)

if __name__ == "__main__":
    main()
