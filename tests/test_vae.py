"""bagel.vae: parity with diffusers' AutoencoderKL (FLUX configuration), checkpoint names, configs, errors."""
import re
from pathlib import Path

import pytest
import torch

from bagel.vae import (AutoEncoder, VAEConfig, latent_position_ids, patchify_latent, to_uint8,
                       unpatchify_latent)

from conftest import reference_keys

# ---------------------------------------------------------------------------------------------- parity

def diffusers_vae(cfg: VAEConfig):
    "diffusers' AutoencoderKL in the FLUX configuration, sized like `cfg`."
    from diffusers import AutoencoderKL
    L = len(cfg.ch_mult)
    return AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.out_ch, latent_channels=cfg.z_channels,
                         block_out_channels=cfg.widths, layers_per_block=cfg.num_res_blocks,
                         down_block_types=("DownEncoderBlock2D",) * L, up_block_types=("UpDecoderBlock2D",) * L,
                         use_quant_conv=False, use_post_quant_conv=False, norm_num_groups=32, act_fn="silu",
                         mid_block_add_attention=True, scaling_factor=cfg.scale_factor,
                         shift_factor=cfg.shift_factor).eval()

_BLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}

def to_diffusers_name(name: str, n_levels: int) -> str:
    "One ae.safetensors name -> the diffusers AutoencoderKL name."
    part, rest = name.split(".", 1)
    if m := re.fullmatch(r"(conv_in|norm_out|conv_out)\.(weight|bias)", rest):
        return f"{part}.{_TOP[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", rest):
        return f"{part}.down_blocks.{m[1]}.resnets.{m[2]}.{_BLOCK[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", rest):
        return f"{part}.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", rest):  # diffusers counts from the top
        return f"{part}.up_blocks.{n_levels - 1 - int(m[1])}.resnets.{m[2]}.{_BLOCK[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", rest):
        return f"{part}.up_blocks.{n_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"mid\.block_([12])\.(\w+)\.(weight|bias)", rest):
        return f"{part}.mid_block.resnets.{int(m[1]) - 1}.{_BLOCK[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest):
        return f"{part}.mid_block.attentions.0.{_ATTN[m[1]]}.{m[2]}"
    raise KeyError(f"no diffusers name for {name}")

def to_diffusers_state_dict(sd: dict, n_levels: int) -> dict:
    "Rename (and reshape the 1x1-conv attention projections to Linear weights)."
    out = {}
    for k, v in sd.items():
        if ".attn_1." in k and k.endswith("weight") and v.ndim == 4: v = v[:, :, 0, 0]
        out[to_diffusers_name(k, n_levels)] = v
    return out

def randomised(cfg: VAEConfig, seed: int = 0) -> AutoEncoder:
    "An AutoEncoder whose GroupNorm affines are not the identity (so swapped norms would show)."
    torch.manual_seed(seed)
    ae = AutoEncoder(cfg).eval()
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if re.search(r"norm\w*\.weight$", name): p.copy_(1 + 0.2 * torch.randn_like(p))
            elif re.search(r"norm\w*\.bias$", name): p.copy_(0.2 * torch.randn_like(p))
    return ae

PARITY_CONFIGS = {
    "tiny": (VAEConfig.tiny(), (2, 3, 32, 40)),
    "widths-change": (VAEConfig(ch=32, ch_mult=(1, 2, 1), num_res_blocks=2), (1, 3, 16, 24)),
}

@pytest.mark.parametrize("key", list(PARITY_CONFIGS))
def test_parity_with_diffusers(key):
    cfg, xshape = PARITY_CONFIGS[key]
    ours = randomised(cfg)
    ref = diffusers_vae(cfg)
    ref.load_state_dict(to_diffusers_state_dict(ours.state_dict(), len(cfg.ch_mult)), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(xshape, generator=g) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode_moments(x)
        ref_mean, ref_logvar = ref.encoder(x).chunk(2, dim=1)
        torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logvar, ref_logvar, atol=1e-5, rtol=1e-5)
        # the scaled mean equals diffusers' posterior mean with FLUX's scale/shift applied
        zm = ours.encode(x, sample=False)
        ref_zm = (ref.encode(x).latent_dist.mean - cfg.shift_factor) * cfg.scale_factor
        torch.testing.assert_close(zm, ref_zm, atol=1e-5, rtol=1e-5)
        # decoder: raw and through the scale/shift
        z = torch.randn(mean.shape, generator=g)
        torch.testing.assert_close(ours.decoder(z), ref.decoder(z), atol=1e-5, rtol=1e-5)
        out = ours.decode(z)
        ref_out = ref.decode(z / cfg.scale_factor + cfg.shift_factor).sample
        assert out.shape == (xshape[0], 3, xshape[2], xshape[3])
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)

def test_parity_detects_a_wrong_mapping():
    "The parity check has teeth: swapping two norms' affines changes the output beyond the tolerance."
    cfg, xshape = PARITY_CONFIGS["tiny"]
    ours = randomised(cfg)
    sd = to_diffusers_state_dict(ours.state_dict(), len(cfg.ch_mult))
    a, b = "encoder.down_blocks.0.resnets.0.norm1.weight", "encoder.down_blocks.0.resnets.0.norm2.weight"
    sd[a], sd[b] = sd[b], sd[a]
    ref = diffusers_vae(cfg)
    ref.load_state_dict(sd, strict=True)
    x = torch.rand(xshape) * 2 - 1
    with torch.no_grad():
        assert (ours.encode_moments(x)[0] - ref.encoder(x).chunk(2, dim=1)[0]).abs().max() > 1e-3

# ------------------------------------------------------------------------------------ checkpoint names

def test_flux_names_and_shapes_match_checkpoint():
    with torch.device("meta"): ae = AutoEncoder(VAEConfig.flux())
    ours = [(k, tuple(v.shape)) for k, v in ae.state_dict().items()]
    ref = list(reference_keys("BAGEL_ae_keys.tsv").items())
    assert len(ref) == 244
    assert dict(ours) == dict(ref)
    assert ours == ref  # same order as the file, too
    assert sum(v.numel() for v in ae.state_dict().values()) == 83_819_683

@pytest.mark.parametrize("cfg", [VAEConfig.flux(), VAEConfig.tiny(), PARITY_CONFIGS["widths-change"][0],
                                 VAEConfig(in_channels=4, out_ch=1, ch=64, ch_mult=(2, 1, 3), num_res_blocks=3,
                                           z_channels=8)],
                         ids=["flux", "tiny", "widths-change", "odd"])
def test_config_from_state_dict(cfg):
    with torch.device("meta"): sd = AutoEncoder(cfg).state_dict()
    assert VAEConfig.from_state_dict(sd) == cfg
    assert VAEConfig.from_state_dict({"ae." + k: v for k, v in sd.items()}, prefix="ae.") == cfg
    assert VAEConfig.from_state_dict(sd, scale_factor=1.0).scale_factor == 1.0

def test_autoencoder_from_state_dict_round_trip():
    ae = randomised(VAEConfig.tiny())
    sd = {k: v.clone() for k, v in ae.state_dict().items()}
    ae2 = AutoEncoder.from_state_dict(sd)
    assert ae2.cfg == VAEConfig.tiny()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ae2.encode(x, sample=False), ae.encode(x, sample=False), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        AutoEncoder.from_state_dict({**sd, "encoder.extra.weight": torch.zeros(1)})

def test_config_from_state_dict_errors():
    with torch.device("meta"): sd = AutoEncoder(VAEConfig.tiny()).state_dict()
    with pytest.raises(ValueError, match="encoder.conv_in.weight' is missing"):
        VAEConfig.from_state_dict({})
    with pytest.raises(ValueError, match="prefix="):
        VAEConfig.from_state_dict({"vae." + k: v for k, v in sd.items()})
    bad = dict(sd); bad["decoder.conv_in.weight"] = torch.empty(32, 8, 3, 3, device="meta")
    with pytest.raises(ValueError, match="2\\*z_channels"):
        VAEConfig.from_state_dict(bad)

# ------------------------------------------------------------------------------------ errors and helpers

@pytest.mark.parametrize("kwargs, msg", [
    (dict(ch=48), "multiples of 32"), (dict(ch=16, ch_mult=(2, 3)), "multiples of 32"),
    (dict(ch_mult=()), "ch_mult"), (dict(ch_mult=(1, 0)), "ch_mult"), (dict(z_channels=0), "z_channels"),
    (dict(in_channels=2.5), "in_channels"), (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(scale_factor=0), "scale_factor")])
def test_config_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg): VAEConfig(**kwargs)

def test_input_errors():
    ae = AutoEncoder(VAEConfig.tiny())
    with pytest.raises(ValueError, match="3 image channels"): ae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"): ae.encode_moments(torch.zeros(1, 3, 16, 20))
    with pytest.raises(ValueError, match="multiples of 8"): ae.encode(torch.zeros(1, 3, 12, 16))
    with pytest.raises(ValueError, match="batch axis"): ae.encode(torch.zeros(3, 16, 16))
    with pytest.raises(TypeError, match="image tensor"): ae.encode([[0.0]])
    with pytest.raises(ValueError, match="16, h, w"): ae.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="16, h, w"): ae.decode(torch.zeros(16, 2, 2))
    with pytest.raises(TypeError, match="VAEConfig"): AutoEncoder(None)

def test_sampling_uses_generator_and_global_rng():
    ae = AutoEncoder(VAEConfig.tiny()).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a = ae.encode(x, generator=torch.Generator().manual_seed(3))
        b = ae.encode(x, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(5); c = ae.encode(x)
        torch.manual_seed(5); d = ae.encode(x)
        m = ae.encode(x, sample=False)
    assert torch.equal(a, b) and torch.equal(c, d)
    assert not torch.equal(a, c) and not torch.equal(a, m)

def test_latent_token_round_trip_and_layout():
    z = torch.randn(2, 16, 10, 14)
    tok = patchify_latent(z)
    assert tok.shape == (2, 35, 64)
    torch.testing.assert_close(unpatchify_latent(tok, 5, 7), z, rtol=0, atol=0)
    # token (r=1, c=2), slot (dy=1, dx=0, channel=5) is latent[5, 2*1+1, 2*2+0]
    assert tok[0, 1 * 7 + 2, (1 * 2 + 0) * 16 + 5] == z[0, 5, 3, 4]
    ids = latent_position_ids(5, 7, 64)
    assert ids[1 * 7 + 2] == 1 * 64 + 2 and ids.dtype == torch.int64
    with pytest.raises(ValueError, match="do not fit"): unpatchify_latent(tok, 7, 5, C=8)
    with pytest.raises(ValueError, match="exceeds"): latent_position_ids(2, 65, 64)

def test_to_uint8_truncates():
    x = torch.tensor([254.9, 254.1, 0.9, 127.5]) / 255 * 2 - 1
    assert to_uint8(x).tolist() == [254, 254, 0, 127]
    with pytest.raises(TypeError, match="floating-point"): to_uint8(torch.zeros(2, dtype=torch.int64))
