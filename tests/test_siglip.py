"""Parity of `bagel.siglip` with transformers' SiglipVisionModel, checkpoint names, and error cases."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bagel.siglip import (MLPConnector, SiglipNaViT, ViTConfig, conv_to_linear_patch_weight,
                          convert_siglip_state_dict, linear_to_conv_patch_weight, pack_vit_images, patchify,
                          vit_position_ids)

from conftest import reference_keys

def ckpt_rows(prefix):
    "name -> shape for the checkpoint rows under `prefix`, prefix stripped."
    return reference_keys("BAGEL_7B_ema_keys.tsv", prefix)

# ---------------------------------------------------------------- parity with transformers
CFG = ViTConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                patch_size=14, image_size=70, rope=False)  # 5x5 position grid, real patch size

def hf_model(cfg):
    "A randomly initialised transformers SiglipVisionModel with `cfg`'s shape (no head), LayerNorms randomised too."
    from transformers import SiglipVisionConfig, SiglipVisionModel
    hcfg = SiglipVisionConfig(**{k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "patch_size", "image_size", "num_channels", "hidden_act",
                              "layer_norm_eps", "attention_dropout")}, vision_use_head=False)
    hf = SiglipVisionModel(hcfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "layer_norm" in n or "post_layernorm" in n: p.add_(0.3 * torch.randn_like(p))
            if n.endswith("bias"): p.normal_(0, 0.1)
    return hf

def ours_from(hf, cfg):
    "Our encoder carrying the transformers model's weights (strict load)."
    m = SiglipNaViT(cfg).eval()
    m.load_state_dict(convert_siglip_state_dict(hf.state_dict(), cfg), strict=True)
    return m

def vm(hf):
    "The module holding embeddings/encoder (transformers 5 flattened `vision_model` into the model)."
    return hf.vision_model if hasattr(hf, "vision_model") else hf

def hf_run(hf, img, ids=None):
    "transformers' last_hidden_state for one image [3, H, W]; `ids` overrides its position ids (smaller images)."
    emb = vm(hf).embeddings
    full = emb.position_ids.clone()
    if ids is not None: emb.position_ids = ids[None]
    try:
        with torch.no_grad(): return hf(pixel_values=img[None]).last_hidden_state[0]
    finally: emb.position_ids = full

@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = hf_model(CFG)
    return hf, ours_from(hf, CFG)

def test_full_grid_matches_transformers(pair):
    hf, ours = pair
    img = torch.randn(3, 70, 70)  # 5x5 patches = the whole position table, HF needs no interpolation
    with torch.no_grad(): y = ours.encode_images([img])[0]
    ref = hf_run(hf, img)
    assert y.shape == ref.shape == (25, 64)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)

def test_smaller_images_match_transformers_with_extrapolated_ids(pair):
    hf, ours = pair
    imgs = [torch.randn(3, 28, 42), torch.randn(3, 56, 14), torch.randn(3, 70, 70)]
    with torch.no_grad(): ys = ours.encode_images(imgs)  # packed together
    for img, y in zip(imgs, ys):
        nh, nw = img.shape[1] // 14, img.shape[2] // 14
        ref = hf_run(hf, img, vit_position_ids(nh, nw, 5))
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # wrong ids (HF's default 0..n-1) give a different answer for a non-full-width image: the ids matter
    assert not torch.allclose(ys[0], hf_run(hf, imgs[0], torch.arange(6)), atol=1e-3)

def test_patch_linear_equals_hf_conv(pair):
    hf, ours = pair
    emb = vm(hf).embeddings
    img = torch.randn(3, 28, 42)
    with torch.no_grad():
        conv = emb.patch_embedding(img[None]).flatten(2).transpose(1, 2)[0]
        lin = ours.vision_model.embeddings.patch_embedding(patchify(img, 14))
    torch.testing.assert_close(lin, conv, atol=1e-5, rtol=1e-5)
    w = emb.patch_embedding.weight
    torch.testing.assert_close(linear_to_conv_patch_weight(conv_to_linear_patch_weight(w)), w, atol=0, rtol=0)

def test_dropping_layers_matches_shallower_transformers():
    "A 3-layer upstream model loaded into a 2-layer config (BAGEL's 27 -> 26) equals the upstream model cut to 2 layers."
    torch.manual_seed(1)
    hf = hf_model(CFG)
    short = CFG.with_load_overrides()
    ours = ours_from(hf, short)
    vm(hf).encoder.layers = vm(hf).encoder.layers[:2]
    img = torch.randn(3, 70, 70)
    with torch.no_grad(): y = ours.encode_images([img])[0]
    torch.testing.assert_close(y, hf_run(hf, img), atol=1e-5, rtol=1e-5)

# ---------------------------------------------------------------- checkpoint names on the meta device
def test_vit_names_and_shapes_match_checkpoint():
    cfg = ViTConfig.siglip_so400m_980().with_load_overrides()
    with torch.device("meta"): m = SiglipNaViT(cfg)
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = ckpt_rows("vit_model.")
    assert len(want) == 421
    assert ours == want
    assert sum(v.numel() for v in m.state_dict().values()) == 402_552_736
    assert list(ours) == list(want)  # same order as the file, too

def test_connector_names_and_shapes_match_checkpoint():
    with torch.device("meta"): c = MLPConnector(1152, 3584)
    want = ckpt_rows("connector.")
    assert len(want) == 4
    assert {k: tuple(v.shape) for k, v in c.state_dict().items()} == want

def test_file_preset_is_not_loadable_without_overrides():
    with pytest.raises(NotImplementedError, match="rope=True"):
        with torch.device("meta"): SiglipNaViT(ViTConfig.siglip_so400m_980())
    cfg = ViTConfig.siglip_so400m_980()
    assert (cfg.num_hidden_layers, cfg.with_load_overrides().num_hidden_layers) == (27, 26)

# ---------------------------------------------------------------- config round trip and errors
def test_config_round_trip():
    d = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
         "patch_size": 14, "image_size": 980, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh",
         "layer_norm_eps": 1e-6, "attention_dropout": 0.0, "rope": True, "model_type": "siglip_vision_model",
         "architectures": ["SiglipVisionModel"], "torch_dtype": "bfloat16"}
    cfg = ViTConfig.from_dict(d)
    assert replace(cfg, extra={}) == ViTConfig.siglip_so400m_980()
    assert cfg.extra == {k: d[k] for k in ("model_type", "architectures", "torch_dtype")}
    assert cfg.to_dict() == d
    assert cfg.with_load_overrides().to_dict() == {**d, "rope": False, "num_hidden_layers": 26}

@pytest.mark.parametrize("kw,exc,msg", [
    (dict(num_attention_heads=3), ValueError, "not divisible by num_attention_heads"),
    (dict(image_size=30), ValueError, "not a multiple of patch_size"),
    (dict(hidden_act="quick_gelu"), ValueError, "unsupported activation"),
    (dict(hidden_size=-32), ValueError, "positive int"),
    (dict(num_hidden_layers=-1), ValueError, "num_hidden_layers must be"),
])
def test_config_errors(kw, exc, msg):
    with pytest.raises(exc, match=msg): ViTConfig.tiny(**kw)

def test_input_errors():
    m = SiglipNaViT(ViTConfig.tiny()).eval()
    pix, pos, cu = pack_vit_images([torch.randn(3, 8, 8), torch.randn(3, 4, 12)], 4, 8)
    with pytest.raises(ValueError, match=r"must be \[n, 48\]"): m(pix[:, :47], pos, cu)
    with pytest.raises(ValueError, match="long tensor"): m(pix, pos[:-1], cu)
    with pytest.raises(ValueError, match=r"lie in \[0, 64\)"): m(pix, pos - 1, cu)
    with pytest.raises(ValueError, match="rise from 0"): m(pix, pos, torch.tensor([0, 5, 4, 7]))
    with pytest.raises(ValueError, match="1-D integer"): m(pix, pos, cu[None])
    with pytest.raises(ValueError, match="not a multiple of patch size"): patchify(torch.randn(3, 8, 10), 4)
    with pytest.raises(ValueError, match="exceeds the position table side"): vit_position_ids(2, 9, 8)
    with pytest.raises(ValueError, match="square conv kernel"): conv_to_linear_patch_weight(torch.zeros(4, 3, 2, 3))
    with pytest.raises(ValueError, match="not 3\\*P\\*P"): linear_to_conv_patch_weight(torch.zeros(4, 13))
    with pytest.raises(TypeError, match="wants a dict"): ViTConfig.from_dict([("hidden_size", 4)])

def test_attention_groups_images_by_length():
    "Packed NaViT attention (batched per distinct length) equals attention image by image, forward and backward."
    from bagel.siglip import NaViTAttention
    torch.manual_seed(0)
    attn = NaViTAttention(ViTConfig.tiny())
    for lens in ([4, 9, 4, 16, 9], [9, 9, 9], [5]):
        x = torch.randn(sum(lens), attn.q_proj.in_features, requires_grad=True)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        got = attn(x, cu)
        ref = torch.cat([attn(x[s:e], torch.tensor([0, e - s])) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
        assert torch.allclose(got, ref, atol=1e-6), lens
        g1, = torch.autograd.grad(got.square().sum(), x)
        g2, = torch.autograd.grad(ref.square().sum(), x)
        assert torch.allclose(g1, g2, atol=1e-5), lens
