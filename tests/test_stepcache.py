"""bagel.stepcache: the schedule, the extrapolation, and the cache inside the sampler and the inferencer."""
import math

import pytest
import torch

from bagel.sampling import Branch, SamplingConfig, sample
from bagel.stepcache import StepCache, _Track

@pytest.fixture(scope="module")
def inf(tmp_path_factory):
    from bagel.inferencer import Inferencer
    from bagel.testing import write_tiny_checkpoint
    return Inferencer.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("sc") / "tiny"), dtype=torch.float32)

def run(inf, steps=12, **kw):
    "Final latent and image of one 64 px T2I (three CFG branches early, one late) from fixed noise."
    out = {}
    noise = [torch.randn(16, inf.config.patch_latent_dim, generator=torch.Generator().manual_seed(0))]
    img = inf.gen_image("a red circle on the left", image_shapes=(64, 64), num_timesteps=steps, noise=noise,
                        progress=False, callback=lambda i, n, x: out.__setitem__("x", x[0].clone()), **kw)[0]
    return out["x"], img

def test_schedule_matches_the_spec():
    # first 5 calls full, then one full every 3 (pattern F T T F ...), per context
    assert StepCache().pattern(17) == "FFFFF" + "TTF" * 4
    assert [k for k in range(49) if StepCache().is_full(k)] == [0, 1, 2, 3, 4] + list(range(7, 49, 3))
    assert StepCache(fresh_threshold=1).pattern(30) == "F" * 30
    assert StepCache(first_enhance=2, fresh_threshold=4).pattern(10) == "FFTTTFTTTF"

def trajectory(cache, f, n):
    tr, out = _Track(None), []
    for k in range(n):
        if cache.is_full(k): cache._update(tr, k, torch.tensor([f(k)], dtype=torch.float64)); out.append(f(k))
        else: out.append(float(cache._predict(tr, k)))
    return torch.tensor(out, dtype=torch.float64)

@pytest.mark.parametrize("order", [1, 2, 4, 6])
def test_taylor_exact_on_lines(order):
    f = lambda k: 1.5 - 0.3 * k
    c = StepCache(max_order=order, dtype=torch.float64)
    torch.testing.assert_close(trajectory(c, f, 40), torch.tensor([f(k) for k in range(40)], dtype=torch.float64))

@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_newton_exact_on_polynomials_up_to_its_order(order):
    for deg in range(order + 1):
        f = lambda k: sum((-1) ** j * (0.2 * k) ** j / (j + 1) for j in range(deg + 1))
        c = StepCache(formula="newton", max_order=order, dtype=torch.float64)
        torch.testing.assert_close(trajectory(c, f, 30), torch.tensor([f(k) for k in range(30)], dtype=torch.float64))
    f = lambda k: (0.2 * k) ** (order + 1)                                    # one degree more: not exact
    assert (trajectory(StepCache(formula="newton", max_order=order, dtype=torch.float64), f, 30)
            - torch.tensor([f(k) for k in range(30)], dtype=torch.float64)).abs().max() > 1e-3

def test_taylor_terms_follow_the_original():
    # derivatives only from call 4 on (k > first_enhance - 2), divided by the distance between full calls
    tr, c = _Track(None), StepCache()
    for k in (0, 1, 2, 3): c._update(tr, k, torch.tensor([float(k ** 3)]))
    assert len(tr.terms) == 1
    c._update(tr, 4, torch.tensor([64.0]))                                  # Δ¹ = (64 - 27) / 1
    torch.testing.assert_close(torch.cat(tr.terms), torch.tensor([64.0, 37.0]))
    c._update(tr, 7, torch.tensor([343.0]))                                 # Δ¹ = 279/3 = 93, Δ² = (93 - 37)/3
    torch.testing.assert_close(torch.cat(tr.terms), torch.tensor([343.0, 93.0, 56 / 3]))
    torch.testing.assert_close(c._predict(tr, 9), torch.tensor([343 + 93 * 2 + 56 / 3 * 4 / 2]))
    c2 = StepCache(max_order=1)
    tr2 = _Track(None)
    for k in (0, 1, 2, 3, 4, 7, 10): c2._update(tr2, k, torch.tensor([float(k)]))
    assert len(tr2.terms) == 2                                              # capped at max_order

def test_counters_are_per_branch_and_skipped_branches_do_not_advance():
    seen = []
    def velocity(ctxs, xs, t):
        seen.append(tuple(ctxs))
        return [torch.full_like(x, float(t)) for x in xs]
    c = StepCache()
    cond, text = object(), object()
    sample(c.wrap(velocity), [torch.zeros(2, 3)], [Branch.cond([cond]), Branch.text([text], 4.0)],
           SamplingConfig(num_timesteps=16, timestep_shift=1.0, cfg_interval=(0.0, 0.5)))
    # cond: calls 0..14 (full 0-4, 7, 10, 13); text joins at step 8 (t <= 0.5): its calls 0..6 (full 0-4)
    assert seen == [(cond,)] * 6 + [(text,), (text,), (cond, text), (text,), (text,), (cond,)]
    assert c.stats == {"full": 8 + 5, "taylor": 7 + 2, "forwards": 12, "calls": 15}

def test_wrap_with_every_call_full_is_the_baseline():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 3, generator=g)
    velocity = lambda ctxs, xs, t: [x @ W * (1 + t) + len(str(c)) for c, x in zip(ctxs, xs)]
    br = [Branch.cond(["c"]), Branch.text(["tt"], 3.0), Branch.img(["iii"], 1.5)]
    x1 = [torch.randn(4, 3, generator=g)]
    cfg = SamplingConfig(num_timesteps=20)
    base = sample(velocity, x1, br, cfg)
    assert torch.equal(sample(StepCache(fresh_threshold=1).wrap(velocity), x1, br, cfg)[0], base[0])
    cached = sample(StepCache().wrap(velocity), x1, br, cfg)[0]
    assert not torch.equal(cached, base[0])

def test_inferencer_off_and_every_step_full_equal_the_baseline(inf):
    x0, img0 = run(inf)
    x_off, img_off = run(inf, step_cache=None)
    x_full, img_full = run(inf, step_cache=StepCache(fresh_threshold=1))
    assert torch.equal(x_off, x0) and torch.equal(x_full, x0)
    assert list(img_full.getdata()) == list(img0.getdata())

def test_inferencer_cache_skips_forwards_and_stays_close(inf):
    x0, _ = run(inf, steps=20)
    c = StepCache()
    x, img = run(inf, steps=20, step_cache=c)
    assert c.stats["forwards"] == c.pattern(19).count("F") == 9 and c.stats["calls"] == 19
    r = ((x - x0).norm() / x0.norm()).item()
    assert 1e-6 < r < 0.2, r
    x2, _ = run(inf, steps=20, step_cache=c)                              # reused: reset per image, deterministic
    assert torch.equal(x2, x)

def test_model_head_reproduces_the_velocity_on_full_calls(inf):
    # the cached feature (last layer output at the latent rows) through norm_moe_gen + llm2vae is the velocity
    m = inf.model
    feats = {}
    c = StepCache()
    vel = c.model_velocity(m, lambda ctxs: [(4, 4)] * len(ctxs))
    ctxs = [m.new_context(), m.new_context()]
    m.extend_text(ctxs[:1], [m.text_block([7, 8, 9])])
    xs = [torch.randn(16, m.config.patch_latent_dim) for _ in ctxs]
    v = vel(ctxs, xs, 0.8)
    tracks = [c._tracks[id(k)] for k in ctxs]
    lm = m.language_model.model
    for tr, vj in zip(tracks, v):
        torch.testing.assert_close(m.llm2vae(lm.norm_moe_gen(tr.terms[0].to(m.dtype))).float(), vj, rtol=1e-5, atol=1e-5)

def test_bad_arguments():
    with pytest.raises(ValueError, match="first_enhance must be an int >= 1"): StepCache(first_enhance=0)
    with pytest.raises(ValueError, match="max_order must be an int >= 0"): StepCache(max_order=-1)
    with pytest.raises(ValueError, match="unknown formula"): StepCache(formula="cubic")
    same = object()
    with pytest.raises(ValueError, match="distinct object"):
        StepCache().wrap(lambda c, x, t: x)([same, same], [torch.zeros(1, 1)] * 2, 0.5)
