"""bagel.quant on the tiny checkpoint: NF4 / INT8 against bf16, the skip list, loading, and the memory planner."""
import logging, warnings

import pytest
import torch
from torch import nn

from conftest import reference_keys
from bagel.model import Bagel, BagelConfig

pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
from bagel.quant import (DEFAULT_SKIP, GiB, INT8_DTYPE_ANCHORS, ORIGINAL_SKIP, QUANT_MODES, InsufficientMemory,
                         linear_bytes, load_quantized, module_bytes, plan_memory, quantizable, quantize_)

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from bagel.testing import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("q") / "tiny")

@pytest.fixture(scope="module")
def bundles(ckpt):
    return {m: load_quantized(ckpt, m) for m in QUANT_MODES}

def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()

def probe(model):
    "Next-token logits after a text block, and the velocity of one noisy 4x4 latent after it."
    ctx = model.new_context()
    logits = model.extend_text([ctx], [model.text_block([10, 11, 12, 13, 14])], return_logits=True)
    x = torch.randn(16, model.config.patch_latent_dim, generator=torch.Generator().manual_seed(1))
    return model.velocity([ctx], [x], 0.6, [(4, 4)])[0], logits

# relative error bounds on the tiny random model (measured: nf4 ~0.11-0.15, int8 ~0.015)
BOUNDS = {"nf4": 0.3, "int8": 0.05}

@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_velocity_and_logits_close_to_bf16(bundles, mode):
    v0, l0 = probe(bundles["bf16"].model)
    v, l = probe(bundles[mode].model)
    assert 1e-4 < rel(v, v0) < BOUNDS[mode], rel(v, v0)       # > 0: the layers really are quantised
    assert 1e-4 < rel(l, l0) < BOUNDS[mode], rel(l, l0)
    assert module_bytes(bundles[mode].model) < 0.8 * module_bytes(bundles["bf16"].model)

@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_short_t2i_same_noise(bundles, mode):
    from bagel.inferencer import Inferencer
    def run(b):
        inf, out = Inferencer(b), {}
        noise = [torch.randn(16, b.config.patch_latent_dim, generator=torch.Generator().manual_seed(0))]
        img = inf.gen_image("a red circle", image_shapes=(64, 64), num_timesteps=6, noise=noise, progress=False,
                            callback=lambda i, n, x: out.__setitem__("x", x[0].clone()))[0]
        return out["x"], img
    x0, img0 = run(bundles["bf16"])
    x, img = run(bundles[mode])
    assert img.size == img0.size == (64, 64)
    assert 1e-4 < rel(x, x0) < BOUNDS[mode], rel(x, x0)

def test_skip_list_stays_unquantised(bundles):
    m = bundles["nf4"].model
    for name in DEFAULT_SKIP:
        for sub_name, sub in m.get_submodule(name).named_modules():
            if isinstance(sub, nn.Linear) or "Linear" in type(sub).__name__:
                assert type(sub) is nn.Linear and sub.weight.dtype == torch.bfloat16, f"{name}.{sub_name}"
    assert type(m.language_model.model.layers[0].self_attn.q_proj_moe_gen).__name__ == "Linear4bit"
    assert type(bundles["int8"].model.vit_model.vision_model.encoder.layers[0].mlp.fc1).__name__ == "Linear8bitLt"
    assert m.language_model.model.embed_tokens.weight.dtype == torch.bfloat16   # embeddings and norms: bf16
    assert bundles["nf4"].vae.encoder.conv_in.weight.dtype == torch.float32     # the VAE is never touched

def test_original_switch_quantises_every_linear(ckpt, bundles):
    n_lin = sum(isinstance(m, nn.Linear) for m in bundles["bf16"].model.modules())
    every = load_quantized(ckpt, "nf4", skip=ORIGINAL_SKIP).model
    assert sum(type(m).__name__ == "Linear4bit" for m in every.modules()) == n_lin
    v, _ = probe(every)                                        # the dtype reads still work (bf16 quant_storage)
    assert torch.isfinite(v).all()
    with pytest.warns(UserWarning, match="int8 keeps"):
        names = quantizable(bundles["bf16"].model, "int8", ORIGINAL_SKIP)
    assert len(names) == n_lin - len(INT8_DTYPE_ANCHORS)

def test_load_quantized_equals_quantize_after_loading(ckpt, bundles):
    q = quantize_(load_quantized(ckpt, "bf16").model, "int8")
    a = q.language_model.model.layers[1].mlp_moe_gen.down_proj.weight
    b = bundles["int8"].model.language_model.model.layers[1].mlp_moe_gen.down_proj.weight
    assert a.dtype == torch.int8 and torch.equal(a.data, b.data)

def test_bad_arguments(ckpt, bundles):
    m = bundles["bf16"].model
    with pytest.raises(ValueError, match="unknown quantisation mode"): load_quantized(ckpt, "fp4")
    with pytest.raises(ValueError, match="name no module"): quantizable(m, "nf4", ("lm_head",))
    with pytest.raises(TypeError, match="tuple of module-name prefixes"): quantizable(m, "nf4", "vae2llm")

def test_plan_weight_bytes_match_the_released_key_list():
    keys = reference_keys("BAGEL_7B_ema_keys.tsv")
    numel = lambda s: int(torch.tensor(s).prod()) if s else 1
    assert sum(numel(s) for s in keys.values()) == 14_607_260_128
    cfg = BagelConfig.bagel_7b_mot()
    with torch.device("meta"): meta = Bagel(cfg)
    for mode in QUANT_MODES:
        q = set(quantizable(meta, mode, DEFAULT_SKIP))
        want = 0
        for k, s in keys.items():
            mod, _, leaf = k.rpartition(".")
            if mod in q and leaf == "weight": want += linear_bytes(*s, mode, bias=False)
            else: want += 2 * numel(s)                       # biases, norms, embeddings, tables: bf16
        assert plan_memory(cfg, mode, devices={"cuda:0": 80 * GiB}).weight_bytes == want, mode
    nf4 = plan_memory(cfg, "nf4", devices={"cuda:0": 80 * GiB}).weight_bytes
    assert 9.0 * GiB < nf4 < 9.5 * GiB                       # 13.5 B params at 0.5625 B + 1.1 B params at 2 B

def test_plan_weight_bytes_match_the_loaded_tiny_model(ckpt, bundles):
    for mode, b in bundles.items():
        assert plan_memory(ckpt, mode, devices={"cpu": GiB}, image_size=64).weight_bytes == module_bytes(b.model, buffers=False)

def test_plan_that_does_not_fit_names_the_fixes():
    cfg = BagelConfig.bagel_7b_mot()
    p = plan_memory(cfg, "bf16", devices={"cuda:0": 24 * GiB})
    assert not p.fits
    with pytest.raises(InsufficientMemory, match="mode='nf4'"): p.require()
    assert "2 devices" in p.message
    p = plan_memory(cfg, "nf4", devices={"cuda:0": 12 * GiB})
    assert not p.fits and "image_size=768" in p.message           # the largest smaller size that fits
    assert plan_memory(cfg, "nf4", devices={"cuda:0": 12 * GiB}, image_size=768).require().fits
    two = plan_memory(cfg, "bf16", devices={"cuda:0": 24 * GiB, "cuda:1": 24 * GiB}).require()
    assert sorted(two.layers["cuda:0"] + two.layers["cuda:1"]) == list(range(28)) and two.layers["cuda:1"]
    big = plan_memory(cfg, "bf16", devices={"cuda:0": 24 * GiB}, batch=4, edit=True)
    assert big.kv_bytes > p.kv_bytes and big.act_bytes > 3 * plan_memory(cfg, "bf16", devices={"cuda:0": GiB}).act_bytes
    with pytest.raises(ValueError, match="free bytes"): plan_memory(cfg, devices={})
    with pytest.raises(TypeError, match="BagelConfig or a model dir"): plan_memory(3)
