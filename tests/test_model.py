"""bagel.model: dtypes, branch switches, gradients through the training forward, batching of the inference calls."""
from dataclasses import replace

import pytest
import torch

from bagel.model import Bagel, BagelConfig, shift_timesteps
from bagel.testing import init_random_, toy_packed_batch

def _model(**kw):
    return init_random_(Bagel(BagelConfig.tiny(**kw)), torch.Generator().manual_seed(0))

def _batch(model):
    P = model.config.vit.patch_size
    g = torch.Generator().manual_seed(3)
    return toy_packed_batch(model, caption=[20, 21, 22], answer=[30, 31, 32], image=torch.rand(3, 2 * P, 3 * P, generator=g) * 2 - 1,
                            latent=torch.randn(16, 6, 4, generator=g), t_raw=-0.2)

def test_training_forward_reaches_both_experts():
    model = _model().train()
    out = model.forward_train(_batch(model), generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(out.ce_logits.float(), _batch(model).packed_label_ids) + \
        (out.velocity_pred - out.velocity_target).pow(2).mean()
    loss.backward()
    layer = model.language_model.model.layers[0]
    for name in ["mlp.gate_proj", "mlp_moe_gen.gate_proj", "self_attn.q_proj", "self_attn.q_proj_moe_gen"]:
        assert layer.get_submodule(name).weight.grad.abs().sum() > 0, name
    for mod in [model.vae2llm, model.llm2vae, model.time_embedder.mlp[0], model.connector.fc1,
                model.vit_model.vision_model.embeddings.patch_embedding]:
        assert mod.weight.grad.abs().sum() > 0
    assert model.latent_pos_embed.pos_embed.grad is None  # fixed table

def test_freeze_und_leaves_the_und_expert_without_gradient():
    model = _model()
    model.config.llm.freeze_und = True
    out = model.forward_train(_batch(model), generator=torch.Generator().manual_seed(0))
    (out.velocity_pred - out.velocity_target).pow(2).mean().backward()
    layer = model.language_model.model.layers[1]
    assert layer.mlp.gate_proj.weight.grad is None or layer.mlp.gate_proj.weight.grad.abs().sum() == 0
    assert layer.mlp_moe_gen.gate_proj.weight.grad.abs().sum() > 0

def test_noise_schedule_and_timestep_shift():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_timesteps(t, 1.0), t)
    s = shift_timesteps(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and bool((s[1:-1] > t[1:-1]).all())  # shift > 1 moves times toward noise

def test_bf16_inference_runs_and_stays_close():
    model = _model().eval()
    ctx32 = model.new_context(); model.extend_text([ctx32], [model.text_block([5, 6, 7])])
    x = torch.randn(4, 64)
    v32 = model.velocity([ctx32], [x], 0.5, [(2, 2)])[0]
    m16 = model.to(torch.bfloat16)
    ctx16 = m16.new_context(); m16.extend_text([ctx16], [m16.text_block([5, 6, 7])])
    v16 = m16.velocity([ctx16], [x], 0.5, [(2, 2)])[0]
    assert v16.dtype == torch.float32
    assert (v16 - v32).abs().max() < 0.1 * v32.abs().max()

@pytest.mark.parametrize("kw", [dict(visual_gen=False), dict(visual_und=False)])
def test_branch_switches(kw):
    model = _model(**kw).eval()
    names = {n for n, _ in model.named_children()}
    assert ("vae2llm" in names) == model.config.visual_gen and ("vit_model" in names) == model.config.visual_und
    ctx = model.new_context()
    logits = model.extend_text([ctx], [model.text_block([5, 6])], return_logits=True)
    assert logits.shape == (1, model.config.llm.vocab_size)

def test_batched_text_prefill_equals_single():
    model = _model().eval()
    blocks = [model.text_block([5, 6, 7, 8]), model.text_block([9]), model.text_block([10, 11])]
    ctxs = [model.new_context() for _ in blocks]
    batched = model.extend_text(ctxs, blocks, return_logits=True)
    for i, b in enumerate(blocks):
        c = model.new_context()
        torch.testing.assert_close(model.extend_text([c], [b], return_logits=True)[0], batched[i], atol=1e-5, rtol=1e-5)
        assert c.rope == ctxs[i].rope == len(b)

def test_packed_batch_encode_images_feeds_the_training_forward():
    from bagel.vae import AutoEncoder
    model = _model().eval()
    vae = init_random_(AutoEncoder(model.config.vae), torch.Generator().manual_seed(1)).eval()
    batch = _batch(model)
    batch.padded_images = torch.rand(1, 3, 48, 32) * 2 - 1      # a 6 x 4 latent grid after the VAE (x8) and p = 2
    batch.padded_latent = None
    batch.encode_images(vae, generator=torch.Generator().manual_seed(0))
    assert batch.padded_latent.shape == (1, 16, 6, 4)
    out = model.forward_train(batch, generator=torch.Generator().manual_seed(0))
    assert out.velocity_pred.shape == out.velocity_target.shape == (6, 64)

def test_flex_padding_pseudo_sample_leaves_outputs_unchanged():
    "A trailing causal pad split (the packer's flex padding) changes no real output."
    import dataclasses
    model = _model().eval()
    batch = _batch(model)
    out = model.forward_train(batch, generator=torch.Generator().manual_seed(0))
    padded = dataclasses.replace(batch, sample_lens=batch.sample_lens + [7], split_lens=batch.split_lens + [7],
                                 attn_modes=batch.attn_modes + ["causal"])
    out2 = model.forward_train(padded, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out2.ce_logits, out.ce_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2.velocity_pred, out.velocity_pred, atol=1e-5, rtol=1e-5)
    bad = dataclasses.replace(batch, sample_lens=batch.sample_lens + [7], split_lens=batch.split_lens + [7],
                              attn_modes=batch.attn_modes + ["full"])
    with pytest.raises(ValueError, match="trailing causal pad"):
        model.forward_train(bad)

def test_packed_batch_to_moves_every_tensor():
    model = _model()
    b = _batch(model)
    assert b.to("cpu") is b                                   # nothing to move
    m = b.to("meta")
    assert all(t.device.type == "meta" for t in vars(m).values() if isinstance(t, torch.Tensor))
    assert m.sample_lens is b.sample_lens and b.packed_text_ids.device.type == "cpu"   # a copy; the original stays

@pytest.mark.parametrize("latent_rope", ["shared", "raster"])
@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_inference_velocity_equals_training_forward(task, latent_rope):
    "The prefix cache + Bagel.velocity predict what forward_train predicts for the same packed sample, noise and time."
    from bagel.packing import PackConfig, PlanItem, Sample, pack_samples
    from bagel.vae import AutoEncoder, patchify_latent
    model = _model(latent_rope=latent_rope).eval(); cfg = model.config
    vae = init_random_(AutoEncoder(cfg.vae), torch.Generator().manual_seed(1)).eval()
    g = torch.Generator().manual_seed(2)
    S, V = 2 * cfg.latent_downsample, 2 * cfg.vit.patch_size
    target, source, vit = (torch.rand(3, s, s, generator=g) * 2 - 1 for s in (S, S, V))
    ids = [5, 6, 7, 8]
    text = PlanItem("text", ids=ids, enable_cfg=True)
    items = [text, PlanItem("vae_image", image=target, loss=True)]
    if task == "edit": items = [PlanItem("vae_image", image=source, enable_cfg=True), PlanItem("vit_image", image=vit, enable_cfg=True)] + items
    pc = PackConfig.from_model(cfg, text_cond_dropout_prob=0, vit_cond_dropout_prob=0, vae_cond_dropout_prob=0)
    b = pack_samples([Sample(items, "k")], pc).encode_images(vae, sample=False)
    with torch.no_grad(): out = model.forward_train(b, generator=torch.Generator().manual_seed(3))
    x0 = patchify_latent(b.padded_latent[-1], cfg.latent_patch_size).float()
    t = shift_timesteps(torch.sigmoid(b.packed_timesteps[torch.isfinite(b.packed_timesteps)][:1]), cfg.timestep_shift)
    x_t = (1 - t) * x0 + t * (out.velocity_target + x0)            # the target is eps - x0
    ctx = model.new_context()
    if task == "edit": model.extend_vae([ctx], [b.padded_latent[0]]); model.extend_vit([ctx], [vit])
    model.extend_text([ctx], [model.text_block(ids)])
    v = model.velocity([ctx], [x_t], t, [(S // cfg.latent_downsample,) * 2])[0]
    assert v.abs().mean() > 1e-3
    torch.testing.assert_close(v, out.velocity_pred, atol=1e-5, rtol=1e-4)
    n = (S // cfg.latent_downsample) ** 2 + 2                       # a framed latent block: its RoPE span
    assert ctx.rope == len(ids) + 2 + (0 if task == "t2i" else (n if latent_rope == "raster" else 1) + 1)
    if latent_rope == "raster":                                     # the layout changes what the same weights predict
        shared = Bagel(replace(cfg, latent_rope="shared")).eval(); shared.load_state_dict(model.state_dict())
        with torch.no_grad(): other = shared.forward_train(replace(b, packed_position_ids=pack_samples(
            [Sample(items, "k")], replace(pc, latent_rope="shared")).packed_position_ids), generator=torch.Generator().manual_seed(3))
        assert (other.velocity_pred - out.velocity_pred).abs().max() > 1e-3


def test_latent_rope_layouts():
    "shared: a framed latent block is one RoPE position; raster: one per token, and the next block starts after it."
    m = _model(latent_rope="raster").eval()
    ctx = m.new_context(); m.extend_text([ctx], [[1, 5, 2]])
    x, pos, g = m._framed(torch.zeros(4, m.config.llm.hidden_size), ctx, True)
    assert pos.tolist() == [3, 4, 5, 6, 7, 8] and m.rope_span(6, True) == 6 and m.rope_span(6, False) == 1
    assert m._framed(torch.zeros(4, m.config.llm.hidden_size), ctx, False)[1].tolist() == [3] * 6   # ViT blocks: one position
    m.extend_vae([ctx], [torch.randn(m.config.vae.z_channels, 4, 4)]); assert ctx.rope == 3 + 6
    s = _model().eval(); c2 = s.new_context(); s.extend_text([c2], [[1, 5, 2]])
    s.extend_vae([c2], [torch.randn(s.config.vae.z_channels, 4, 4)]); assert c2.rope == 4
    with pytest.raises(ValueError, match="'shared' \\(BAGEL's layout"): BagelConfig.tiny(latent_rope="2d")

def test_uint8_packs_train_as_float_packs():
    "PackConfig(uint8_pixels=True): the VAE encode and the training forward see the float pack's values, so the outputs are equal."
    from bagel.packing import PackConfig, PlanItem, Sample, pack_samples
    from bagel.vae import AutoEncoder
    model = _model().eval(); cfg = model.config
    vae = init_random_(AutoEncoder(cfg.vae), torch.Generator().manual_seed(1)).eval()
    g = torch.Generator().manual_seed(2)
    px = lambda h, w: torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    S, V = cfg.latent_downsample, cfg.vit.patch_size
    samples = [Sample([PlanItem("text", ids=[5, 6], enable_cfg=True), PlanItem("vae_image", image=px(2 * S, 3 * S), loss=True)], "a"),
               Sample([PlanItem("vae_image", image=px(S, S), enable_cfg=True), PlanItem("vit_image", image=px(2 * V, V), enable_cfg=True),
                       PlanItem("text", ids=[7], enable_cfg=True), PlanItem("vae_image", image=px(S, 2 * S), loss=True)], "b"),
               Sample([PlanItem("vit_image", image=px(V, 2 * V)), PlanItem("text", ids=[8, 9], loss=True)], "c")]
    pc = PackConfig.from_model(cfg, text_cond_dropout_prob=0, vit_cond_dropout_prob=0, vae_cond_dropout_prob=0)
    outs = []
    for u8 in (False, True):
        b = pack_samples(samples, replace(pc, uint8_pixels=u8)).encode_images(vae, torch.Generator().manual_seed(4))
        with torch.no_grad(): outs.append(model.forward_train(b, generator=torch.Generator().manual_seed(3)))
    assert outs[0].velocity_pred.abs().mean() > 1e-3
    for f in ("ce_logits", "velocity_pred", "velocity_target"): assert torch.equal(getattr(outs[0], f), getattr(outs[1], f)), f
