"""bagel.packing: round trips, RoPE / CE / mask rules against independent references, the PackedDataset loop."""
import math, random, warnings
from dataclasses import replace

import pytest
import torch

from bagel.model import SpecialTokens
from bagel.packing import (PackBuilder, PackConfig, PlanItem, Sample, SequencePacker, attn_plan, block_mask, flex_pad,
                           pack_samples, sample_len, unpack)

NO_DROP = dict(text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0, vae_cond_dropout_prob=0.0)

def rand_sample(rng: random.Random, key: str, cfg: PackConfig) -> Sample:
    "A random plan: texts (some with loss / special-token loss), ViT images, clean and noisy VAE images, frames."
    items = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.choice(["text", "text", "vit_image", "vae_image"])
        cfg_ = rng.random() < 0.5
        if kind == "text":
            stl = rng.random() < 0.3
            items.append(PlanItem("text", ids=[rng.randint(10, 400) for _ in range(rng.randint(0, 7))], enable_cfg=cfg_,
                                  loss=rng.random() < 0.5, special_token_loss=stl, special_token_label=cfg.tokens.start_of_image if stl else None))
        else:
            s = cfg.vit_patch_size if kind == "vit_image" else cfg.latent_downsample
            img = torch.randn(3, s * rng.randint(1, 4), s * rng.randint(1, 4), generator=torch.Generator().manual_seed(rng.randint(0, 9999)))
            loss = kind == "vae_image" and rng.random() < 0.5
            items.append(PlanItem(kind, image=img, enable_cfg=cfg_ and not loss, loss=loss,
                                  frame_delta=rng.choice([None, None, None, 3]) if kind == "vae_image" else None))
    return Sample(items, key=key)

def ref_positions(batch, cfg_samples_kept):
    "RoPE positions rebuilt from the §4.4 table for samples whose kept items are known."
    out = []
    for items in cfg_samples_kept:
        rope = 0
        for it, kept in items:
            if not kept: rope += 0 if it.type == "text" else 1; continue
            if it.type == "text":
                n = len(it.ids) + 2; out += range(rope, rope + n); rope += n; continue
            s = cfg.vit_patch_size if it.type == "vit_image" else cfg.latent_downsample
            n = (it.image.shape[1] // s) * (it.image.shape[2] // s) + 2
            out += [rope] * n
            rope += it.frame_delta if it.frame_delta is not None else (0 if it.loss else 1)
    return out

cfg = PackConfig.tiny()

def ref_mask(sample_lens, split_lens, modes) -> torch.Tensor:
    "The §4.5 rule written out split by split (independent of bagel.mot)."
    n = sum(sample_lens)
    sample = torch.repeat_interleave(torch.arange(len(sample_lens)), torch.tensor(sample_lens))
    split = torch.repeat_interleave(torch.arange(len(split_lens)), torch.tensor(split_lens))
    mode = [modes[j] for j in split.tolist()]
    M = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            if sample[q] != sample[k]: continue
            ok = k <= q or (split[q] == split[k] and mode[q] in ("full", "noise"))
            if mode[k] == "noise" and split[k] != split[q]: ok = False
            M[q, k] = ok
    return M

def test_round_trip_random():
    c = replace(cfg, **NO_DROP)
    for seed in range(20):
        rng = random.Random(seed)
        samples = [rand_sample(rng, f"s{seed}/{i}", c) for i in range(rng.randint(1, 4))]
        batch = pack_samples(samples, c, seed)
        back = unpack(flex_pad(batch, batch.sequence_length + 7), c)
        assert len(back) == len(samples)
        for s, u in zip(samples, back):
            assert len(s.items) == len(u.items)
            for x, y in zip(s.items, u.items):
                last = x is s.items[-1]
                assert y.frame_delta == (None if last else x.frame_delta)
                assert (x.type, x.ids, bool(x.loss), x.special_token_loss, x.special_token_label) == \
                       (y.type, y.ids, bool(y.loss), y.special_token_loss, y.special_token_label)
                if x.type != "text": assert torch.equal(x.image, y.image)
        assert batch.packed_position_ids.tolist() == ref_positions(batch, [[(it, True) for it in s.items] for s in samples])

def test_cfg_dropout_rope_and_rates():
    "Dropped images keep a RoPE slot, dropped texts none; drop rates follow the trainer defaults."
    c = PackConfig.tiny()
    assert (c.text_cond_dropout_prob, c.vit_cond_dropout_prob, c.vae_cond_dropout_prob) == (0.1, 0.3, 0.3)
    cap = PlanItem("text", ids=[11, 12], enable_cfg=True)
    src = PlanItem("vae_image", image=torch.zeros(3, 16, 16), enable_cfg=True)
    vit = PlanItem("vit_image", image=torch.zeros(3, 4, 4), enable_cfg=True)
    tgt = PlanItem("vae_image", image=torch.zeros(3, 16, 16), loss=True)
    kept = {"text": 0, "vae": 0, "vit": 0}
    N = 3000
    for i in range(N):
        b = PackBuilder(c); b.add(Sample([src, vit, cap, tgt], key=str(i)), random.Random(i)); batch = b.build()
        modes = batch.attn_modes
        has_text = "causal" in modes
        kept["text"] += has_text
        vit_kept, vae_kept = len(batch.packed_vit_token_indexes) > 0, len(batch.patchified_vae_latent_shapes) == 2
        kept["vit"] += vit_kept; kept["vae"] += vae_kept
        # the noisy target sits after 2 image slots (kept or dropped) plus the caption when kept
        assert batch.packed_position_ids[-1].item() == 2 + (4 if has_text else 0)
        assert modes[-1] == "noise"
    assert abs(kept["text"] / N - 0.9) < 0.03 and abs(kept["vit"] / N - 0.7) < 0.04 and abs(kept["vae"] / N - 0.7) < 0.04

def test_ce_labels_are_next_tokens():
    c = replace(cfg, **NO_DROP, ce_loss_reweighting=True)
    rng = random.Random(1)
    samples = [rand_sample(rng, f"k{i}", c) for i in range(6)]
    batch = pack_samples(samples, c)
    text = dict(zip(batch.packed_text_indexes.tolist(), batch.packed_text_ids.tolist()))
    eos, soi = c.tokens.eos_token_id, c.tokens.start_of_image
    for p, lab, w in zip(batch.ce_loss_indexes.tolist(), batch.packed_label_ids.tolist(), batch.ce_loss_weights.tolist()):
        if text[p] in (eos, c.tokens.end_of_image): assert lab == soi and w == 1.0     # special-token loss
        else: assert text[p + 1] == lab and 0 < w <= 1
    n_loss = sum(len(it.ids) + 1 for s in samples for it in s.items if it.type == "text" and it.loss)
    n_special = sum(it.special_token_loss for s in samples for it in s.items)
    assert len(batch.ce_loss_indexes) == n_loss + n_special

def test_block_mask_matches_rules_and_flex():
    from torch.nn.attention.flex_attention import flex_attention
    c = replace(cfg, **NO_DROP)
    rng = random.Random(7)
    batch = pack_samples([rand_sample(rng, f"m{i}", c) for i in range(4)], c)
    padded = flex_pad(batch, batch.sequence_length + 21)
    ref = ref_mask(padded.sample_lens, padded.split_lens, padded.attn_modes)
    assert torch.equal(attn_plan(padded).dense_mask(packed=True), ref)
    n = sum(padded.sample_lens)
    bm = block_mask(padded, block_size=16)
    i = torch.arange(n)
    assert torch.equal(bm.mask_mod(0, 0, i[:, None], i[None, :]), ref)
    nb = math.ceil(n / 16)
    blocks = torch.nn.functional.pad(ref, (0, nb * 16 - n, 0, nb * 16 - n)).reshape(nb, 16, nb, 16).any(3).any(1)
    assert torch.equal(bm.to_dense()[0, 0].bool(), blocks)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = flex_attention(q, k, v, block_mask=bm)
    torch.testing.assert_close(o, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ref), atol=1e-5, rtol=1e-5)

def test_no_cross_sample_and_noise_hidden():
    c = replace(cfg, **NO_DROP)
    rng = random.Random(3)
    samples = [Sample([PlanItem("text", ids=[5, 6]), PlanItem("vae_image", image=torch.zeros(3, 32, 16), loss=True),
                       PlanItem("vae_image", image=torch.zeros(3, 32, 16)), PlanItem("text", ids=[7], loss=True),
                       PlanItem("vae_image", image=torch.zeros(3, 16, 16), loss=True)], key="a"),
               rand_sample(rng, "b", c)]
    batch = pack_samples(samples, c)
    M = attn_plan(batch).dense_mask(packed=True)
    a = batch.sample_lens[0]
    assert not M[:a, a:].any() and not M[a:, :a].any()
    cu = [0]
    for n in batch.split_lens: cu.append(cu[-1] + n)
    for j, m in enumerate(batch.attn_modes):
        lo, hi = cu[j], cu[j + 1]
        if m == "noise":
            assert not M[hi:a, lo:hi].any()                # no later token of the sample sees a noisy split
            assert M[lo:hi, lo:hi].all()                    # bidirectional inside
            earlier_clean = [jj for jj in range(j) if batch.attn_modes[jj] != "noise"]
            for jj in earlier_clean: assert M[lo:hi, cu[jj]:cu[jj + 1]].all()   # sees every earlier clean split
    # the second noisy image does not see the first one
    assert batch.attn_modes[:5] == ["causal", "noise", "full", "causal", "noise"]
    assert not M[cu[4]:cu[5], cu[1]:cu[2]].any()

def test_packer_budget_mandatory_and_quirks():
    c = replace(cfg, expected_num_tokens=100, max_num_tokens=120, max_num_tokens_per_sample=60, prefer_buffer_before=50,
                max_buffer_size=2, **NO_DROP)
    txt = lambda n, key: Sample([PlanItem("text", ids=[9] * (n - 2))], key=key, index={"key": key})
    # mandatory: a sample of exactly max_num_tokens_per_sample is refused ('<'), in a weighted group it is packed ('>')
    seq = {"m": iter([txt(60, "m0")] + [txt(10, f"m{i}") for i in range(1, 20)]), "g": iter([txt(60, "g0")] + [txt(45, f"g{i}") for i in range(1, 50)])}
    packer = SequencePacker(c, {"g": 1.0}, mandatory=["m"], seed=0)
    gen = packer.packs(lambda g: next(seq[g]))
    b1 = next(gen)
    assert b1.sample_lens == [10, 60, 45]                   # m0 (60) skipped by the mandatory check; g0 (60) accepted
    for _ in range(4):
        b = next(gen)
        assert b.sequence_length <= c.max_num_tokens and b.sample_lens[0] == 10
    # a flush loses the sample that triggered it (buffer of size 0: every misfit flushes)
    c2 = replace(c, max_buffer_size=0)
    seq2 = iter([txt(45, f"x{i}") for i in range(30)])
    drawn = []
    def draw(g):
        s = next(seq2); drawn.append(s.key); return s
    gen2 = SequencePacker(c2, {"x": 1.0}, seed=0).packs(draw)
    packs = [next(gen2) for _ in range(3)]
    assert [p.sample_lens for p in packs] == [[45, 45]] * 3
    assert len(drawn) == 9                                    # x2, x5, x8 triggered the flushes and were dropped

def test_packer_deterministic_and_resume():
    c = replace(cfg, pad_to_max=True)
    def synth(g, i):
        r = random.Random(f"{g}/{i}")
        items = [PlanItem("text", ids=[5] * r.randint(1, 40), enable_cfg=True),
                 PlanItem("vae_image", image=torch.full((3, 16 * r.randint(1, 4), 16 * r.randint(1, 4)), float(i)), loss=True)]
        return Sample(items, key=f"{g}/{i}", index={"i": i})
    def source(start=None):
        cnt = dict(start or {})
        def draw(g):
            cnt[g] = cnt.get(g, 0) + 1; return synth(g, cnt[g] - 1)
        return draw, cnt
    w = {"a": 1.0, "b": 2.0}
    run = lambda seed: [p for p, _ in zip(SequencePacker(c, w, ["a"], seed=seed).packs(source()[0]), range(5))]
    x, y, z = run(0), run(0), run(1)
    assert all(torch.equal(p.packed_timesteps, q.packed_timesteps) and p.sample_lens == q.sample_lens for p, q in zip(x, y))
    assert any(p.sample_lens != q.sample_lens or not torch.equal(p.packed_timesteps, q.packed_timesteps) for p, q in zip(x, z))
    for cut in range(1, 6):
        p1 = SequencePacker(c, w, ["a"], seed=4); d1, c1 = source(); g1 = p1.packs(d1)
        for _ in range(cut): next(g1)
        st, cnt = p1.state_dict(), dict(c1)
        want = [next(g1) for _ in range(3)]
        p2 = SequencePacker(c, w, ["a"], seed=4); p2.load_state_dict(st, fetch=lambda g, ix: synth(g, ix["i"]))
        got = [p for p, _ in zip(p2.packs(source(cnt)[0]), range(3))]
        for a, b in zip(want, got):
            assert a.sample_lens == b.sample_lens and torch.equal(a.packed_text_ids, b.packed_text_ids)
            assert torch.equal(a.packed_timesteps, b.packed_timesteps) and torch.equal(a.padded_images, b.padded_images)

def test_errors():
    with pytest.raises(ValueError, match="max_num_tokens_per_sample"): PackConfig(max_num_tokens_per_sample=10**6)
    with pytest.raises(ValueError, match="empty pack"): PackBuilder(cfg).build()
    with pytest.raises(ValueError, match="multiple of 4"): pack_samples([Sample([PlanItem("vit_image", image=torch.zeros(3, 6, 8))])], cfg)
    with pytest.raises(ValueError, match="vit_image cannot carry"): PlanItem("vit_image", image=torch.zeros(3, 4, 4), loss=True)
    with pytest.raises(ValueError, match="not one of"): PlanItem("audio")
    assert sample_len(Sample([PlanItem("text", ids=[1, 2, 3]), PlanItem("vae_image", image=torch.zeros(3, 32, 16))]), cfg) == 5 + 4
