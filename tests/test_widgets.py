"""bagel.widgets: CFG sweep grid and cache, routing traces (train and velocity), panels without a display."""
import numpy as np
import pytest
import torch

from bagel.inferencer import Inferencer
from bagel.testing import toy_packed_batch, write_tiny_checkpoint
from bagel.widgets import (SweepCache, cfg_sweep_panel, denoise_states, plot_routing, plot_sweep, prepare_prompt,
                           routing_panel, sweep_grid, trace_train, trace_velocity)

FIX = dict(num_timesteps=3)

@pytest.fixture(scope="module")
def inf(tmp_path_factory):
    return Inferencer.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny"), dtype=torch.float32)

@pytest.fixture
def calls(inf):
    n = {"n": 0}
    h = inf.model.language_model.model.register_forward_pre_hook(lambda *a: n.__setitem__("n", n["n"] + 1))
    yield n
    h.remove()

def test_grid_shape_follows_axes_and_cache_skips_the_model(inf, calls):
    cache = SweepCache()
    axes = {"cfg_renorm_type": ["global", "channel"], "cfg_text_scale": [1.0, 2.0, 5.0]}
    res = sweep_grid(inf, "a blue square", axes, FIX, (32, 32), seed=3, judge=lambda im: 1.0, cache=cache)
    assert res.shape == (2, 3) and [len(r) for r in res.images] == [3, 3] and np.array(res.scores).shape == (2, 3)
    assert res.settings[1][0]["cfg_renorm_type"] == "channel" and res.settings[1][0]["cfg_text_scale"] == 1.0
    n = calls["n"]; assert n > 0 and cache.misses == 6
    again = sweep_grid(inf, "a blue square", axes, FIX, (32, 32), seed=3, cache=cache)
    assert calls["n"] == n and cache.hits == 6
    for r1, r2 in zip(res.images, again.images):
        for a, b in zip(r1, r2): assert np.array_equal(np.asarray(a), np.asarray(b))
    other = sweep_grid(inf, "a blue square", {"cfg_text_scale": [5.0], "cfg_img_scale": [1.5]}, FIX, (32, 32), seed=4, cache=cache)
    assert calls["n"] > n                                   # another seed is another key
    assert not np.array_equal(np.asarray(other.images[0][0]), np.asarray(res.images[0][2]))
    plot_sweep(res)

def test_same_noise_in_every_cell(inf):
    res = sweep_grid(inf, "a green star", {"cfg_text_scale": [1.0], "timestep_shift": [1.0, 2.0]}, FIX, (32, 32), seed=1)
    x1 = torch.randn(4, inf.config.patch_latent_dim, generator=torch.Generator().manual_seed(1))
    for j, s in enumerate([1.0, 2.0]):
        ref = inf.gen_image("a green star", image_shapes=(32, 32), noise=[x1], cfg_text_scale=1.0, timestep_shift=s,
                            progress=False, **FIX)[0]
        assert np.array_equal(np.asarray(res.images[0][j]), np.asarray(ref))

def test_sweep_errors(inf):
    with pytest.raises(ValueError, match="exactly two"): sweep_grid(inf, "x", {"cfg_text_scale": [1.0]}, image_shape=(32, 32))
    with pytest.raises(ValueError, match="unknown axes"): sweep_grid(inf, "x", {"a": [1], "b": [2]}, image_shape=(32, 32))
    with pytest.raises(ValueError, match="needs image_shape"): sweep_grid(inf, "x", {"cfg_text_scale": [1.0], "cfg_img_scale": [1.0]})

def _check_probs(tr):
    assert torch.equal(tr.mask, tr.plan.dense_mask(packed=True))
    for p in tr.probs:
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:2]), atol=1e-5)
        assert (p[:, ~tr.mask] == 0).all()
    for a, b in zip(tr.recomputed, tr.module_out): assert torch.allclose(a, b, atol=1e-4)

def test_velocity_trace_routing_matches_the_call(inf):
    p, log = prepare_prompt(inf, "a red circle left of a cross")
    states = denoise_states(inf, p, (32, 64), seed=0)
    seen = []
    h = inf.model.language_model.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["is_gen"].clone()), with_kwargs=True)
    tr = trace_velocity(inf.model, [p.cond, p.img], [states[1][1]] * 2, states[1][0], [(2, 4)] * 2, log)
    h.remove()
    assert len(seen) == 1 and torch.equal(tr.is_gen, seen[0])
    assert tr.is_gen.tolist() == ([False] + [True] * 8 + [False]) * 2
    assert tr.mask.shape == (20, len(p.cond) + len(p.img) + 20)
    assert tr.key_labels.count("noisy latent") == 16 and "context" not in tr.key_labels
    _check_probs(tr)

def test_train_trace_routing(inf):
    torch.manual_seed(0)
    b = toy_packed_batch(inf.model, [5, 6], [7, 8, 9], torch.rand(3, 28, 28) * 2 - 1, torch.randn(16, 4, 4), 0.5)
    tr = trace_train(inf.model, b, torch.Generator().manual_seed(0))
    want = torch.zeros(b.sequence_length, dtype=torch.bool); want[b.packed_vae_token_indexes] = True
    assert torch.equal(tr.is_gen, want)
    assert {tr.key_labels[i] for i in b.packed_vit_token_indexes.tolist()} == {"vit"}
    _check_probs(tr)
    plot_routing(tr, 0, 1)
    with pytest.raises(ValueError, match="outside"): plot_routing(tr, 5, 0)

def test_panels_build_without_display(inf, calls):
    import ipywidgets as W
    sp = cfg_sweep_panel(inf, "a red circle", image_shape=(32, 32))
    assert isinstance(sp, W.VBox) and isinstance(sp.controls["rows"], W.Dropdown)
    sp.controls["row_values"].value, sp.controls["col_values"].value = "1, 3", "1.5"
    sp.controls["num_timesteps"].value = 3
    assert sp.run().shape == (2, 1)
    n = calls["n"]; sp.run(); assert calls["n"] == n
    rp = routing_panel(inf, "a red circle", (32, 32))
    rp.draw(); rp.controls["layer"].value = 1
    assert list(rp.traces) == [0] and isinstance(rp.controls["step"], W.IntSlider)
