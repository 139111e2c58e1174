"""The position probe with distinct RoPE positions for an image's tokens: the experiment of bench/RESULTS.md,
*Binding probe: distinct RoPE positions for image tokens* (CPU, 2026-11-30).

BAGEL gives every token of an image one RoPE position (the image's slot); a token's place enters only through the
2-D sin-cos table added to its input. Here, for this probe only, the 9 latent tokens of an image get positions
slot + 1 ... slot + 9 in reading order, in training (the packed batch's position ids) and in sampling (the framed
block `Bagel.velocity` runs), so attention between two image tokens sees their offset (3 * rows + columns). It patches
two functions at run time and changes nothing in the package; the released checkpoint's function is untouched.

    python bench/results/probe_distinct_rope_cpu_2026-11-30/run.py --kind position --steps 1000 --shift 4 --eval-n 100

(As run, the first line put the checkout on sys.path by its absolute path; it is relative here. Nothing else differs.)
"""
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import bench.probe_binding as pb
from bagel import model as bm

_make = pb.make_pack
def make_pack(*a, **k):
    b = _make(*a, **k)
    pos = b.packed_position_ids.clone()
    idx = b.packed_vae_token_indexes.view(-1, 9)          # 9 tokens per image, one image per sample
    pos[idx] = pos[idx] + 1 + torch.arange(9)
    return replace(b, packed_position_ids=pos)
pb.make_pack = make_pack

_framed = bm.Bagel._framed
def framed(self, inner, ctx, inner_gen):
    x, pos, g = _framed(self, inner, ctx, inner_gen)
    if inner_gen: pos = pos.clone(); pos[1:-1] += 1 + torch.arange(len(pos) - 2, device=pos.device)
    return x, pos, g
bm.Bagel._framed = framed

pb.main(sys.argv[1:])
