"""bagel.sampling: schedule, branch gating, guidance and renorm, Euler, the packed sampler loop, the tiny model end to end."""
import pytest
import torch

from bagel.sampling import (RENORM_TYPES, Branch, SamplingConfig, active_branches, euler_step, guide,
                            packed_global_guide, sample, timestep_schedule)

def _recorder(log: list):
    "A fake model: v depends on the context's name, the state and t; every call is recorded."
    def velocity(ctxs, xs, t):
        log.append((list(ctxs), [x.clone() for x in xs], t))
        return [torch.tanh(x) * (1 + len(c)) + t * (0.5 if c.startswith("c") else -0.3) for c, x in zip(ctxs, xs)]
    return velocity

def _branches(n: int, s_t: float = 4.0, s_i: float = 1.5) -> list:
    return [Branch.cond([f"c{j}" for j in range(n)]), Branch.text([f"t{j}" + "x" * j for j in range(n)], s_t),
            Branch.img([f"i{j}" + "xy" * j for j in range(n)], s_i)]

# --- config and schedule

def test_config_defaults_are_the_inferencers():
    c = SamplingConfig()
    assert (c.num_timesteps, c.timestep_shift, c.cfg_interval, c.cfg_renorm_type, c.cfg_renorm_min) == \
        (50, 3.0, (0.4, 1.0), "global", 0.0)
    assert RENORM_TYPES == ("global", "channel", "text_channel")
    assert SamplingConfig(cfg_interval=[0.4, 1]) == c
    low = SamplingConfig.generate_image_defaults()
    assert (low.num_timesteps, low.timestep_shift, low.cfg_interval) == (24, 1.0, (0.0, 1.0))

@pytest.mark.parametrize("kw, msg", [
    (dict(cfg_renorm_type="lcoal"), "use one of ('global', 'channel', 'text_channel')"),
    (dict(cfg_renorm_type="local"), "never implemented"),
    (dict(cfg_interval=(1.0, 0.4)), "start <= end"),
    (dict(cfg_interval=(-0.1, 1.0)), "0 <= start"),
    (dict(cfg_interval=(0.4, 1.0, 1.0)), "pair"),
    (dict(num_timesteps=1), "num_timesteps must be an int >= 2"),
    (dict(num_timesteps=True), "num_timesteps"),
    (dict(timestep_shift=0.0), "timestep_shift must be > 0"),
    (dict(cfg_renorm_min=-0.5), "cfg_renorm_min must lie in [0, 1]"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError) as e: SamplingConfig(**kw)
    assert msg in str(e.value)

def test_schedule_matches_formula_and_spec():
    ts = timestep_schedule(50, 3.0)
    assert ts.dtype == torch.float32 and ts.shape == (50,) and ts[0] == 1 and ts[-1] == 0
    spec = [1.0, 0.9931, 0.9860, 0.9787, 0.9712]
    assert torch.allclose(ts[:5], torch.tensor(spec), atol=5e-5)
    assert torch.allclose(ts[-4:], torch.tensor([0.1636, 0.1132, 0.0588, 0.0]), atol=5e-5)
    tau = torch.linspace(1, 0, 50, dtype=torch.float64)
    assert torch.allclose(ts.double(), 3 * tau / (1 + 2 * tau), atol=1e-6)
    assert torch.equal(timestep_schedule(11, 1.0), torch.linspace(1, 0, 11))
    assert (ts[:-1] > ts[1:]).all()
    with pytest.raises(ValueError, match="timestep_shift"): timestep_schedule(10, -2.0)

# --- gating

def test_gating_interval_bounds_and_image_needs_text():
    cfg, full = SamplingConfig(), _branches(1)
    names = lambda bs, t, c=cfg: [b.name for b in active_branches(bs, t, c)]
    assert names(full, 1.0) == ["cond", "text", "img"]        # upper bound closed
    assert names(full, 0.4) == ["cond"]                        # lower bound open
    assert names(full, 0.41) == ["cond", "text", "img"]
    assert names(full, 0.1) == ["cond"]
    assert names(_branches(1, s_t=1.0), 0.9) == ["cond"]       # image-only guidance is never applied
    assert names([full[0], full[2]], 0.9) == ["cond"]
    assert names(_branches(1, s_i=1.0), 0.9) == ["cond", "text"]
    assert names(full[::-1], 0.9) == ["cond", "text", "img"]
    wide = SamplingConfig(cfg_interval=(0.0, 1.0))
    assert names(full, 1e-6, wide) == ["cond", "text", "img"] and names(full, 0.0, wide) == ["cond"]
    ts = timestep_schedule(50, 3.0)[:-1].tolist()
    assert sum(len(active_branches(full, t, cfg)) == 3 for t in ts) == 41

def test_branch_errors():
    with pytest.raises(ValueError, match="exactly one 'cond'"): active_branches(_branches(1)[1:], 0.9, SamplingConfig())
    with pytest.raises(ValueError, match="may appear once"): active_branches(_branches(1) + [Branch.text(["t"], 2.0)], 0.9, SamplingConfig())
    with pytest.raises(ValueError, match="unknown branch name"): Branch("neg", ["n"])
    with pytest.raises(TypeError, match="wrap a single context"): Branch.text("ctx", 4.0)
    with pytest.raises(TypeError, match="Branch records"): active_branches([("cond", ["c"])], 0.9, SamplingConfig())

# --- guidance

@pytest.mark.parametrize("rt", RENORM_TYPES)
def test_guide_identities(rt):
    vc, vt, vi = torch.randn(3, 20, 16).unbind(0)
    assert torch.allclose(guide(vc, vt, vi, 1.0, 1.0, rt), vc, atol=1e-6)            # scale 1 = the cond branch
    assert torch.equal(guide(vc, None, None, 4.0, 1.5, rt), vc)                      # no text branch
    assert torch.equal(guide(vc, None, vi, 4.0, 1.5, rt), vc)                        # image guidance alone: never
    a = vt + 4 * (vc - vt)
    assert torch.allclose(guide(vc, vt, None, 4.0, 1.0, rt, 1.0), a, atol=1e-5)       # renorm_min = 1: no renorm
    assert torch.allclose(guide(vc, vt, vi, 4.0, 1.5, rt, 1.0), vi + 1.5 * (a - vi), atol=1e-5)
    out = guide(vc, vt, vi, 4.0, 1.5, rt)
    assert not torch.allclose(out, vi + 1.5 * (a - vi), atol=1e-3)                    # ... and renorm_min = 0 does shrink

def test_guide_renorm_types_against_hand_computation():
    vc = torch.tensor([[3.0, 4.0], [0.0, 1.0]])              # token norms 5, 1
    vt = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    vi = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    a = 2 * vc - vt                                           # s_t = 2: [[6, 8], [0, 1]]
    g = guide(vc, vt, None, 2.0, 1.0, "global")
    assert torch.allclose(g, a * (26 / 101) ** 0.5, atol=1e-6)                        # one factor for the image
    assert torch.allclose(guide(vc, vt, None, 2.0, 1.0, "channel"), vc, atol=1e-6)    # per token: [6, 8] -> [3, 4]
    assert torch.allclose(guide(vc, vt, None, 2.0, 1.0, "channel", 0.8), torch.tensor([[4.8, 6.4], [0.0, 1.0]]), atol=1e-6)
    b = vi + 3 * (a - vi)                                     # s_i = 3, then renorm per token
    want = b * (vc.norm(dim=-1, keepdim=True) / b.norm(dim=-1, keepdim=True)).clamp(max=1)
    assert torch.allclose(guide(vc, vt, vi, 2.0, 3.0, "channel"), want, atol=1e-6)
    ar = torch.tensor([[3.0, 4.0], [0.0, 1.0]])               # text_channel: renorm a first, then image guidance
    assert torch.allclose(guide(vc, vt, vi, 2.0, 3.0, "text_channel"), vi + 3 * (ar - vi), atol=1e-6)

def test_guide_errors():
    vc = torch.randn(4, 8)
    with pytest.raises(ValueError, match="same \\[n_tokens, D\\] tokens"): guide(vc, torch.randn(5, 8), None, 4.0, 1.0)
    with pytest.raises(ValueError, match="v_i has shape"): guide(vc, vc, torch.randn(4, 7), 4.0, 1.5)
    with pytest.raises(ValueError, match="never implemented"): guide(vc, vc, None, 4.0, 1.0, "local")

def test_global_per_image_vs_original_packed():
    vcs = [torch.randn(16, 8), 10 * torch.randn(9, 8)]
    vts = [vcs[0] + 0.1 * torch.randn(16, 8), 10 * torch.randn(9, 8)]
    vis = [torch.randn(16, 8), torch.randn(9, 8)]
    for j in range(2):                                        # one image: identical
        assert torch.equal(packed_global_guide(vcs[j:j + 1], vts[j:j + 1], vis[j:j + 1], 4.0, 1.5)[0],
                           guide(vcs[j], vts[j], vis[j], 4.0, 1.5, "global"))
    packed = packed_global_guide(vcs, vts, None, 4.0, 1.0)
    ours = [guide(c, t, None, 4.0, 1.0, "global") for c, t in zip(vcs, vts)]
    assert not torch.allclose(packed[0], ours[0], atol=1e-2)  # two images of different norms: they differ
    assert packed[0].norm() < 0.5 * vcs[0].norm() <= ours[0].norm()

# --- Euler

def test_euler_exact_on_constant_field():
    x1, x0 = torch.randn(7, 5), torch.randn(7, 5)
    ts, x = timestep_schedule(13, 2.0), x1
    for i in range(12): x = euler_step(x, x1 - x0, ts[i], ts[i + 1])
    assert torch.allclose(x, x0, atol=1e-6)
    assert torch.equal(euler_step(x1, torch.full((7, 5), 2.0), 0.5, 0.25), x1 - 0.5)

# --- the loop

def test_sample_calls_velocity_once_per_step_branch_major():
    xs, log = [torch.randn(6, 4), 5 * torch.randn(9, 4)], []
    bs = _branches(2)
    sample(_recorder(log), xs, bs, SamplingConfig())
    assert len(log) == 49                                     # N = 50 -> 49 calls
    ts = timestep_schedule(50, 3.0)[:-1].tolist()
    assert [t for _, _, t in log] == ts
    guided = [c for c, _, t in log if 0.4 < t <= 1.0]
    assert len(guided) == 41 and all(c == ["c0", "c1", "t0", "t1x", "i0", "i1xy"] for c in guided)
    assert all(c == ["c0", "c1"] for c, _, t in log if t <= 0.4)
    for c, xin, _ in log:                                     # states repeated per branch, image order kept
        assert len(xin) == len(c)
        for k in range(0, len(xin), 2): assert torch.equal(xin[k], xin[0]) and torch.equal(xin[k + 1], xin[1])
    assert torch.equal(log[0][1][0], xs[0]) and torch.equal(log[0][1][1], xs[1])

@pytest.mark.parametrize("rt", RENORM_TYPES)
def test_sample_batch_equals_single_images(rt):
    xs, bs = [torch.randn(6, 4), 5 * torch.randn(9, 4), 0.2 * torch.randn(3, 4)], _branches(3)
    cfg = SamplingConfig(num_timesteps=10, cfg_renorm_type=rt)
    batch = sample(_recorder([]), xs, bs, cfg)
    for j, x in enumerate(xs):
        one = sample(_recorder([]), [x], [Branch(b.name, [b.ctxs[j]], b.scale) for b in bs], cfg)[0]
        assert torch.allclose(batch[j], one, atol=1e-6)

def test_sample_state_fp32_callback_and_progress(capsys):
    x = torch.randn(5, 3, dtype=torch.bfloat16)
    seen = []
    out = sample(lambda c, xs, t: [v.to(torch.bfloat16) for v in xs], [x], [Branch.cond(["c"])], SamplingConfig.tiny(),
                 callback=lambda step, total, xs: seen.append((step, total, xs[0].dtype)), progress=True)
    assert out[0].dtype == torch.float32
    assert seen == [(1, 3, torch.float32), (2, 3, torch.float32), (3, 3, torch.float32)]
    assert "3/3" in capsys.readouterr().err                   # the tqdm bar

def test_sample_integrates_a_linear_flow_exactly():
    x0, x1 = torch.randn(10, 2), torch.randn(10, 2)
    out = sample(lambda c, xs, t: [(x - x0) / t for x in xs], [x1], [Branch.cond([None])], SamplingConfig(num_timesteps=7))
    assert torch.allclose(out[0], x0, atol=1e-5)

def test_sample_errors():
    xs, bs, cfg = [torch.randn(6, 4)], _branches(1), SamplingConfig.tiny()
    with pytest.raises(TypeError, match="for one image pass \\[x1\\]"): sample(_recorder([]), xs[0], bs, cfg)
    with pytest.raises(ValueError, match="one context per image"): sample(_recorder([]), xs * 2, bs, cfg)
    with pytest.raises(ValueError, match="x1\\[0\\] must be a \\[n_tokens, D\\] tensor"): sample(_recorder([]), [torch.randn(6)], bs, cfg)
    with pytest.raises(ValueError, match="one \\[n_tokens, D\\] tensor per context"): sample(lambda c, x, t: x[:1], xs, bs, cfg)
    with pytest.raises(ValueError, match="shape of its noisy tokens"): sample(lambda c, x, t: [v[:2] for v in x], xs, bs, cfg)

# --- the tiny model end to end

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from bagel.checkpoint import from_pretrained
    from bagel.testing import write_tiny_checkpoint
    return from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"), dtype=torch.float32)

def test_sample_with_the_tiny_model(tiny):
    model, tok = tiny.model, tiny.tokenizer
    cond = model.new_context()
    model.extend_text([cond], [model.text_block(tok.encode("a red circle"))])
    n_cached = len(cond)
    h, w = 3, 4
    vel = lambda ctxs, x, t: model.velocity(ctxs, x, t, [(h, w)] * len(x))
    x1 = torch.randn(h * w, 64)
    cfg = SamplingConfig.tiny()
    branches = [Branch.cond([cond]), Branch.text([model.new_context()], 4.0)]
    guided = sample(vel, [x1], branches, cfg)[0]
    plain = sample(vel, [x1], branches[:1], cfg)[0]
    assert guided.shape == (h * w, 64) and guided.dtype == torch.float32 and torch.isfinite(guided).all()
    assert (guided - plain).abs().max() > 1e-2                # guidance changes the result
    assert len(cond) == n_cached                              # sampling never touches a cache
    ts, x = timestep_schedule(4, 3.0), x1                     # == separate model calls per branch, guided by hand
    for i in range(3):
        v_c, v_t = (vel([b.ctxs[0]], [x], float(ts[i]))[0] for b in branches)
        x = euler_step(x, guide(v_c, v_t, None, 4.0, 1.0), ts[i], ts[i + 1])
    assert torch.allclose(guided, x, atol=1e-4)

def test_tiny_model_batch_of_two_prompts(tiny):
    model, tok = tiny.model, tiny.tokenizer
    conds = [model.new_context() for _ in range(2)]
    model.extend_text(conds, [model.text_block(tok.encode(p)) for p in ["a red circle", "two blue squares"]])
    grids = [(2, 2), (3, 2)]
    vel = lambda ctxs, x, t: model.velocity(ctxs, x, t, grids * (len(x) // 2))
    xs = [torch.randn(h * w, 64) for h, w in grids]
    branches = [Branch.cond(conds), Branch.text([model.new_context(), model.new_context()], 3.0),
                Branch.img([c.fork() for c in conds], 1.5)]
    cfg = SamplingConfig.tiny(cfg_renorm_type="text_channel")
    out = sample(vel, xs, branches, cfg)
    for j, (h, w) in enumerate(grids):
        one = sample(lambda ctxs, x, t: model.velocity(ctxs, x, t, [(h, w)] * len(x)), [xs[j]],
                     [Branch(b.name, [b.ctxs[j]], b.scale) for b in branches], cfg)[0]
        assert torch.allclose(out[j], one, atol=1e-4)
