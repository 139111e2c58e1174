"""A CPU probe of binding in the BAGEL training path: two-object prompts on a grid of latent tokens, without pixels.

The kinds that fail on the GPU (colour attribute, position; bench/RESULTS.md) are posed on a 3 x 3 grid of latent
tokens, one token per ShapesWorld cell: a cell's token is zero when empty and code(shape) + code(colour) when it holds
an object, with fixed random codes. Scenes and prompts come from `bagel.shapesworld.t2i_sample`; the real code trains
on them (packer, `forward_train`, `train_step` with EMA) and samples them (`Bagel.velocity`, `bagel.sampling.sample`,
CFG against the text-dropped context). Each sampled token is read as its nearest code, and the ShapesWorld judge scores
the objects read (`spec_failure`) and says how the pair was drawn (`pair_layout`). No VAE, no drawing: what is left is
placing two objects and binding their attributes, in minutes on a CPU. `--kind cell` is the control for position:
one object at a cell the prompt names ("a red circle in the top left corner"), placed from the words alone.
`--kind anchored` keeps the position prompts but always puts their second-named shape in the center, so the words
alone decide where the other shape goes, without one token having to find where another object stands.

    python -m bench.probe_binding --kind color_attr --steps 1000 --shift 4      # ~11 min on 2 cores
"""
import argparse, collections, random, time
from dataclasses import replace
from pathlib import Path

import torch

COLUMNS = ["kind", "timestep shift", "steps", "samples/step", "train s", "final mse", "cfg", "cfg interval", "items", "pass", "two objects read", "pair layouts", "failures"]

class World:
    "Fixed random codes, one per shape and per colour, in the model's latent-token width `dim`."
    def __init__(self, dim: int, seed: int = 1, norm: float = 8.0):
        from bagel import shapesworld as sw
        self.shapes, self.colors, self.dim = list(sw.SHAPES), list(sw.COLORS), dim
        g = torch.Generator().manual_seed(seed)
        def codes(n: int) -> torch.Tensor:   # n random directions of length `norm`
            x = torch.randn(n, dim, generator=g)
            return x / x.norm(dim=1, keepdim=True) * norm
        self.code_s, self.code_c = codes(len(self.shapes)), codes(len(self.colors))
        self.table = torch.cat([torch.zeros(1, dim), (self.code_s[:, None] + self.code_c[None]).reshape(-1, dim)])  # 0: empty

    def tokens(self, objects) -> torch.Tensor:  # ShapesWorld objects -> [9, dim], cells in reading order
        from bagel import shapesworld as sw
        t = torch.zeros(9, self.dim)
        for o in objects: t[sw.CELLS.index(o.cell)] = self.code_s[self.shapes.index(o.shape)] + self.code_c[self.colors.index(o.color)]
        return t

    def read(self, tokens: torch.Tensor) -> list:  # [9, dim] -> ShapesWorld objects at the nearest codes (size not modelled)
        from bagel import shapesworld as sw
        k = torch.cdist(tokens.float(), self.table).argmin(1).tolist()
        n = len(self.colors)
        return [sw.Obj(self.shapes[(j - 1) // n], self.colors[(j - 1) % n], "large", sw.CELLS[i]) for i, j in enumerate(k) if j]

class Vocab:
    "Word ids for the prompts, above the model's special tokens."
    def __init__(self, size: int, first: int = 10): self.ids, self.size, self.first = {}, size, first
    def __call__(self, text: str) -> list:
        out = [self.ids.setdefault(w, self.first + len(self.ids)) for w in text.split()]
        if max(out) >= self.size: raise ValueError(f"the probe's prompts need more than the model's {self.size} token ids")
        return out

KINDS = ("color_attr", "position", "cell", "anchored", "counting", "two_object")   # the last two: as in ShapesWorld

def item(rng: random.Random, kind: str, world: World) -> dict:
    "A prompt, its judge spec and its token grid: a ShapesWorld T2I sample of `kind`, or for 'cell' one object at a named cell."
    from bagel import shapesworld as sw
    if kind == "cell":     # the control for position: an absolute place in the words, nothing to coordinate between objects
        o = sw.Obj(rng.choice(sw.SHAPES), rng.choice(list(sw.COLORS)), "large", rng.choice(sw.CELLS))
        return {"prompt": f"a {o.color} {o.shape} {sw._CELL_AT[o.cell]}", "tokens": world.tokens([o]),
                "spec": {"include": [{"shape": o.shape, "color": o.color, "cell": o.cell, "count": 1}], "tag": "cell"}}
    s = sw.t2i_sample(rng, "position" if kind == "anchored" else kind)
    prompt, objects = rng.choice(s["prompts"]), s["scene"].objects
    if kind == "anchored":  # a position prompt whose second-named shape always stands in the center: the words alone say
        last = max(objects, key=lambda o: prompt.split().index(o.shape))   # which side the first-named one goes (the
        a, b = replace(last, cell="center"), next(o for o in objects if o is not last)   # spec's reference: either)
        fits = lambda c: sw.spec_failure(s["spec"], [a, replace(b, cell=c)]) is None
        objects = [a, replace(b, cell=rng.choice([c for c in sw.CELLS if c != "center" and fits(c)]))]
    return {"prompt": prompt, "spec": s["spec"], "tokens": world.tokens(objects)}

def make_pack(rng, kind: str, n: int, world: World, vocab: Vocab, bcfg, pc):
    "One packed batch of n T2I samples, its latents set directly (no VAE encode)."
    from bagel.packing import PlanItem, Sample, pack_samples
    from bagel.vae import unpatchify_latent
    side = 3 * bcfg.latent_downsample
    its = [item(rng, kind, world) for _ in range(n)]
    b = pack_samples([Sample([PlanItem("text", ids=vocab(it["prompt"]), enable_cfg=True),
                              PlanItem("vae_image", image=torch.zeros(3, side, side), loss=True)], "probe") for it in its], pc)
    p, C = bcfg.latent_patch_size, bcfg.vae.z_channels          # cell i is token i of the 3 x 3 latent grid
    return replace(b, padded_latent=unpatchify_latent(torch.stack([it["tokens"] for it in its]), 3, 3, p, C))

def judge(items: list, sampled: list, world: World) -> dict:
    "Pass rate, two-object reads, pair layouts and failure reasons of sampled token grids, by the ShapesWorld judge."
    from bagel import shapesworld as sw
    two, lay, why = 0, collections.Counter(), collections.Counter()
    for it, x in zip(items, sampled):
        objs = world.read(x)
        why[sw.spec_failure(it["spec"], objs)] += 1      # None: passed
        two += len(objs) == 2
        lay[sw.pair_layout(it["spec"], objs) or "no_pair"] += 1
    return {"items": len(items), "pass": why.pop(None, 0), "two": two, "layouts": dict(lay), "failures": dict(why)}

def model_sampler(net, vocab: Vocab, shift: float, cfg_scale: float, num_timesteps: int = 30, cfg_interval: tuple = (0.0, 1.0)):
    "sample(item, seed) -> [9, dim]: the trained model's image for the item's prompt, text CFG against the empty context."
    from bagel.sampling import Branch, SamplingConfig, sample
    sc = SamplingConfig(num_timesteps=num_timesteps, timestep_shift=shift, cfg_interval=cfg_interval)
    vel = lambda ctxs, xs, t: net.velocity(ctxs, xs, t, [(3, 3)] * len(xs))
    def run(it: dict, seed: int) -> torch.Tensor:
        ctx = net.new_context(); net.extend_text([ctx], [net.text_block(vocab(it["prompt"]))])
        x1 = [torch.randn(9, net.config.latent_patch_size ** 2 * net.config.vae.z_channels, generator=torch.Generator().manual_seed(seed))]
        branches = [Branch("cond", [ctx])] + ([Branch("text", [net.new_context()], cfg_scale)] if cfg_scale > 1 else [])
        with torch.no_grad(): return sample(vel, x1, branches, sc)[0]
    return run

def main(argv=None):
    from bagel.distributed import make_mesh
    from bagel.model import LATENT_ROPES, BagelConfig
    from bagel.packing import PackConfig
    from bagel.train import EMA, TrainConfig, build_model, make_optimizer, model_config, train_step
    from bench.common import RESULTS, guided_settings, interval, report
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=KINDS, default="color_attr",
                    help="cell: one object at a cell the prompt names (absolute place, the control for position); "
                         "anchored: position prompts whose second-named shape is always in the center")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--per-pack", type=int, default=96, help="samples per optimizer step")
    ap.add_argument("--shift", type=float, default=1.0, help="timestep shift in training and sampling")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 4.0], help="text CFG scales to sample with")
    ap.add_argument("--cfg-interval", type=interval, nargs="+", default=[(0.0, 1.0)], metavar="START,END",
                    help="the t ranges that guidance acts on (t = 1: noise), each sampled with every --cfg above 1")
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--latent-rope", choices=LATENT_ROPES, default="shared",
                    help="RoPE of the latent tokens (BagelConfig.latent_rope): BAGEL's one position per image, or one per token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=None, help="RESULTS.md to append to (default bench/RESULTS.md)")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.per_pack < 1 or a.eval_n < 1: raise SystemExit("--steps, --per-pack and --eval-n must be >= 1")
    torch.manual_seed(a.seed)
    bcfg = BagelConfig.shapesworld(latent_rope=a.latent_rope)   # the CPU recipe's model: 128 wide, 4 layers
    world, vocab = World(bcfg.latent_patch_size ** 2 * bcfg.vae.z_channels), Vocab(bcfg.llm.vocab_size)
    pc = PackConfig.from_model(bcfg, text_cond_dropout_prob=0.1, vit_cond_dropout_prob=0, vae_cond_dropout_prob=0)
    tcfg = TrainConfig(lr=a.lr, warmup_steps=min(100, a.steps), total_steps=a.steps, lr_scheduler="wsd", ema=0.995,
                       ema_warmup=True, max_grad_norm=1.0, mixed_precision="fp32", timestep_shift=a.shift)
    net = build_model(model_config(tcfg, bcfg), tcfg, make_mesh("NO_SHARD", 1, None, "cpu"), torch.device("cpu"))
    opt, sched = make_optimizer(net, tcfg); ema = EMA(net, tcfg.ema, warmup=True)
    rng, gen, t0, mse = random.Random(a.seed), torch.Generator().manual_seed(a.seed), time.perf_counter(), []
    for step in range(1, a.steps + 1):
        r = train_step(net, opt, sched, ema, [make_pack(rng, a.kind, a.per_pack, world, vocab, bcfg, pc)], tcfg, gen)
        mse.append(float(r["mse"]))
        if step % 100 == 0: print(f"step {step}: mse {sum(mse[-100:]) / 100:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_s = time.perf_counter() - t0
    net.load_state_dict(ema.full_state_dict(), strict=True); net.eval()
    erng = random.Random(10_000 + a.seed)                # held-out draws: another stream than training's
    items = [item(erng, a.kind, world) for _ in range(a.eval_n)]
    rows, label = [], a.kind if a.latent_rope == "shared" else f"{a.kind} (latent_rope {a.latent_rope})"
    for scale, span in guided_settings(a.cfg, a.cfg_interval):
        run = model_sampler(net, vocab, a.shift, scale, cfg_interval=span)
        j = judge(items, [run(it, i) for i, it in enumerate(items)], world)
        rows.append([label, a.shift, a.steps, a.per_pack, round(train_s), round(sum(mse[-10:]) / len(mse[-10:]), 4), scale,
                     list(span) if scale > 1 else "",
                     j["items"], j["pass"], j["two"], *(", ".join(f"{k} {v}" for k, v in sorted(j[c].items())) for c in ("layouts", "failures"))])
    report("Binding probe on a 3 x 3 grid of latent tokens (bench/probe_binding.py)", COLUMNS, rows,
           notes="CPU recipe model (BagelConfig.shapesworld); one token per cell, code(shape) + code(colour); "
                 f"{a.per_pack} samples a step, lr {a.lr}, WSD, EMA 0.995; 30 sampling steps; items judged by the "
                 "ShapesWorld judge on the nearest codes.", results=RESULTS if a.results is None else Path(a.results))
    return rows

if __name__ == "__main__":
    main()
