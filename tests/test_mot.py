"""Parity and contract tests of bagel.mot (the Qwen2 MoT decoder).

(a) with every token routed to und, decoder + lm_head equals transformers' Qwen3 (qk_norm) / Qwen2 (no qk_norm);
(b) the 7B parameter names and shapes equal BAGEL_7B_ema_keys.tsv (meta device);
(c) sdpa == flex on a mixed packed plan with caches; the flash_attn plumbing against a stand-in kernel;
(d) error cases.
"""
import math, os, sys, types
from pathlib import Path

import pytest
import torch

from bagel.mot import (AttnPlan, KVCache, LLMConfig, Qwen2MoTForCausalLM, copy_und_to_gen_, packed_attention)

from conftest import reference_keys


def rand_lm(cfg: LLMConfig, seed: int) -> Qwen2MoTForCausalLM:
    "Tiny model, random weights including the norms."
    torch.manual_seed(seed)
    lm = Qwen2MoTForCausalLM(cfg)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "norm" in n: p.copy_(1 + 0.2 * torch.randn_like(p))
    return lm.eval()


def hf_twin(cfg: LLMConfig, seed: int):
    "A transformers Qwen3 (qk_norm) or Qwen2 model of the same shape with random weights, and ours loaded from it."
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                  rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if cfg.qk_norm:
        hf = Qwen3ForCausalLM(Qwen3Config(**common, attention_bias=True, head_dim=cfg.head_dim))
    else:
        hf = Qwen2ForCausalLM(Qwen2Config(**common))
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n: p.copy_(1 + 0.2 * torch.randn_like(p))
            elif n.endswith("o_proj.bias"): p.zero_()  # Qwen3's attention_bias also adds an o_proj bias; Qwen2/BAGEL have none
            else: p.copy_(0.05 * torch.randn_like(p))
    hf.eval()
    ours = Qwen2MoTForCausalLM(cfg).eval()
    sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("o_proj.bias")}
    res = ours.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == []
    assert res.missing_keys and all("_moe_gen" in k for k in res.missing_keys)  # only the gen expert is new
    return hf, ours


@pytest.mark.parametrize("qk_norm", [True, False])
def test_matches_transformers(qk_norm):
    cfg = LLMConfig.tiny(qk_norm=qk_norm, num_hidden_layers=3)
    hf, ours = hf_twin(cfg, seed=0)
    torch.manual_seed(1)
    ids_a, ids_b = torch.randint(0, cfg.vocab_size, (11,)), torch.randint(0, cfg.vocab_size, (6,))
    pos_a, pos_b = torch.arange(11) + 3, torch.arange(6)
    with torch.no_grad():
        ref_a = hf(input_ids=ids_a[None], position_ids=pos_a[None]).logits[0]
        ref_b = hf(input_ids=ids_b[None], position_ids=pos_b[None]).logits[0]
        got_a = ours.logits(ours.model(ours.model.embed_tokens(ids_a), pos_a, AttnPlan.single(11)))
        torch.testing.assert_close(got_a, ref_a, atol=1e-5, rtol=1e-5)
        # two sequences packed, is_gen all False (same as None)
        ids, pos = torch.cat([ids_a, ids_b]), torch.cat([pos_a, pos_b])
        h = ours.model(ours.model.embed_tokens(ids), pos, AttnPlan.batch([11, 6]), is_gen=torch.zeros(17, dtype=torch.bool))
        torch.testing.assert_close(ours.logits(h), torch.cat([ref_a, ref_b]), atol=1e-5, rtol=1e-5)
        # prefill 7 + cached decoding of 4 tokens
        cache = KVCache(cfg.num_hidden_layers)
        h = ours.model(ours.model.embed_tokens(ids_a[:7]), pos_a[:7], AttnPlan.single(7), caches=[cache], update_cache=True)
        outs = [ours.logits(h)]
        for t in range(7, 11):
            h = ours.model(ours.model.embed_tokens(ids_a[t:t + 1]), pos_a[t:t + 1], AttnPlan.single(1, kv_len=t),
                           caches=[cache], update_cache=True)
            outs.append(ours.logits(h))
        torch.testing.assert_close(torch.cat(outs), ref_a, atol=1e-5, rtol=1e-5)
    assert len(cache) == 11


def test_gen_expert_is_a_full_copy():
    "copy_und_to_gen_ makes gen routing identical; without the copy, gen routing differs."
    cfg = LLMConfig.tiny()
    lm = rand_lm(cfg, 3)
    torch.manual_seed(0)
    x, pos, plan = torch.randn(10, cfg.hidden_size), torch.arange(10), AttnPlan.from_splits([[(4, "causal"), (6, "full")]])
    is_gen = torch.arange(10) >= 4
    with torch.no_grad():
        assert (lm.model(x, pos, plan, is_gen) - lm.model(x, pos, plan)).abs().max() > 1e-2
        copy_und_to_gen_(lm)
        torch.testing.assert_close(lm.model(x, pos, plan, is_gen), lm.model(x, pos, plan), atol=1e-5, rtol=1e-5)


def test_7b_names_and_shapes():
    want = list(reference_keys("BAGEL_7B_ema_keys.tsv", "language_model.").items())
    assert len(want) == 788
    with torch.device("meta"):
        lm = Qwen2MoTForCausalLM(LLMConfig.qwen2_5_7b())
    got = [(n, tuple(t.shape)) for n, t in lm.state_dict().items()]
    assert got == want  # names, shapes and state-dict order
    assert sum(t.numel() for t in lm.state_dict().values()) == 14_141_252_608
    assert [n for n, _ in lm.named_buffers()] == ["model.rotary_emb.inv_freq"]


def test_7b_from_file_with_overrides():
    "A Qwen2.5 llm_config.json (no BAGEL keys, qk_norm off) becomes the 7B MoT after the load overrides."
    d = LLMConfig.qwen2_5_7b().to_dict()
    d.update(qk_norm=False, layer_module="Qwen2DecoderLayer", tie_word_embeddings=True)
    cfg = LLMConfig.from_dict(d)
    with pytest.raises(NotImplementedError, match="with_load_overrides"):
        with torch.device("meta"): Qwen2MoTForCausalLM(cfg)
    with torch.device("meta"):
        lm = Qwen2MoTForCausalLM(cfg.with_load_overrides())
    assert len(lm.state_dict()) == 788


def naive(q, k, v, plan):
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(g, 1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~plan.dense_mask(packed=True), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.repeat_interleave(g, 1))


def test_sdpa_equals_flex_with_cache():
    torch.manual_seed(0)
    plan = AttnPlan.from_splits([[(2, "causal"), (5, "full"), (4, "noise")], [(6, "causal")], [(1, "causal")],
                                 [(3, "full"), (2, "causal")], [(5, "noise")]], kv_lens=[4, 3, 7, 0, 2])
    q, k, v = torch.randn(plan.n_q, 6, 8), torch.randn(plan.n_k, 2, 8), torch.randn(plan.n_k, 2, 8)
    sdpa, flex = packed_attention(q, k, v, plan, "sdpa"), packed_attention(q, k, v, plan, "flex")
    torch.testing.assert_close(sdpa, flex, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa, naive(q, k, v, plan), atol=1e-5, rtol=1e-5)


def test_sdpa_calls_are_fused_kernel_shaped(monkeypatch):
    "Every SDPA call gets 4-D inputs (3-D ones fall back to the math kernel on GPUs) and no grouped heads with a mask."
    import torch.nn.functional as F
    calls, real = [], F.scaled_dot_product_attention
    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.dim(), k.dim(), q.shape[1] == k.shape[1] or attn_mask is None, kw.get("enable_gqa")))
        return real(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    plan = AttnPlan.from_splits([[(2, "causal"), (5, "full")], [(6, "causal")], [(3, "noise")]], kv_lens=[4, 3, 2])
    q, k, v = torch.randn(plan.n_q, 6, 8), torch.randn(plan.n_k, 2, 8), torch.randn(plan.n_k, 2, 8)
    torch.testing.assert_close(packed_attention(q, k, v, plan, "sdpa"), naive(q, k, v, plan), atol=1e-5, rtol=1e-5)
    assert len(calls) == 3 and all(c[:3] == (4, 4, True) for c in calls)
    assert [c[3] for c in calls] == [False, False, True]      # masked: heads repeated; unmasked (noise): flash's GQA


def test_model_sdpa_equals_flex_with_cache():
    "Whole decoder, MoT routing, cached prefix of different lengths, both backends."
    cfg = LLMConfig.tiny()
    lm = rand_lm(cfg, 7)
    torch.manual_seed(0)
    with torch.no_grad():
        caches = []
        for n in (5, 3):  # prefill two text prefixes
            c = KVCache(cfg.num_hidden_layers)
            lm.model(torch.randn(n, cfg.hidden_size), torch.arange(n), AttnPlan.single(n), caches=[c], update_cache=True)
            caches.append(c)
        plan = AttnPlan.from_splits([[(1, "causal"), (6, "noise"), (1, "causal")], [(4, "full")]], kv_lens=[5, 3])
        x = torch.randn(plan.n_q, cfg.hidden_size)
        pos = torch.tensor([5, 6, 6, 6, 6, 6, 6, 6, 3, 3, 3, 3])
        is_gen = torch.tensor([0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
        out = {}
        for backend in ("sdpa", "flex"):
            lm.model.cfg.attn_backend = backend
            out[backend] = lm.model(x, pos, plan, is_gen, caches=caches)
        lm.model.cfg.attn_backend = "sdpa"
    torch.testing.assert_close(out["sdpa"], out["flex"], atol=1e-5, rtol=1e-5)
    assert [len(c) for c in caches] == [5, 3]  # no update_cache


def fake_flash_attn(calls):
    "A stand-in flash_attn module: varlen attention by explicit loops, bottom-right causal."
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        calls.append(dict(cu_q=cu_q.tolist(), cu_k=cu_k.tolist(), max_q=max_q, max_k=max_k, causal=causal,
                          dtype=cu_q.dtype, scale=softmax_scale))
        outs = []
        for i in range(len(cu_q) - 1):
            qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
            g = qi.shape[1] // ki.shape[1]
            s = torch.einsum("qhd,khd->hqk", qi, ki.repeat_interleave(g, 1)) * softmax_scale
            if causal:
                nq, nk = qi.shape[0], ki.shape[0]
                s = s.masked_fill(torch.arange(nk)[None] > torch.arange(nq)[:, None] + nk - nq, float("-inf"))
            outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vi.repeat_interleave(g, 1)))
        return torch.cat(outs)
    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def test_flash_attn_plumbing(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    torch.manual_seed(0)
    for plan in (AttnPlan.batch([4, 1, 3], "causal", [2, 6, 0]), AttnPlan.batch([3, 5], ["full", "noise"], [4, 0])):
        q, k, v = torch.randn(plan.n_q, 4, 8), torch.randn(plan.n_k, 2, 8), torch.randn(plan.n_k, 2, 8)
        torch.testing.assert_close(packed_attention(q, k, v, plan, "flash_attn"), packed_attention(q, k, v, plan),
                                   atol=1e-5, rtol=1e-5)
    assert calls[0] == dict(cu_q=[0, 4, 5, 8], cu_k=[0, 6, 13, 16], max_q=4, max_k=7, causal=True,
                            dtype=torch.int32, scale=8 ** -0.5)
    assert calls[1]["causal"] is False and calls[1]["cu_k"] == [0, 7, 12]


def test_flash_attn_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    plan = AttnPlan.single(3)
    q, k = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    with pytest.raises(ImportError, match="needs the flash-attn package"):
        packed_attention(q, k, k, plan, "flash_attn")


def test_errors():
    cfg = LLMConfig.tiny()
    with pytest.raises(ValueError, match="valid modes: causal, full, noise"): AttnPlan.single(3, "bidirectional")
    with pytest.raises(ValueError, match="crosses the end of sequence 1"):
        AttnPlan([2, 3, 2], [0, 0, 0], [2, 2, 3], ["causal"] * 3)
    with pytest.raises(ValueError, match="one per sequence"): AttnPlan.batch([2, 3], "causal", [0])
    with pytest.raises(TypeError, match="list of ints"): AttnPlan([2.5], [0], [2.5], ["causal"])
    with pytest.raises(ValueError, match="valid: sdpa, flex, grouped, flash_attn"):
        packed_attention(torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4), AttnPlan.single(3), "naive")
    with pytest.raises(ValueError, match="needs every sequence to be one causal split"):
        packed_attention(torch.randn(5, 2, 4), torch.randn(5, 2, 4), torch.randn(5, 2, 4),
                         AttnPlan([5], [0], [2, 3], ["causal", "full"]), "flash_attn")
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"): LLMConfig.tiny(hidden_size=66)
    with pytest.raises(ValueError, match="must be a positive int"): LLMConfig.tiny(num_hidden_layers=2.0)
    with pytest.raises(ValueError, match="unknown layer_module"): LLMConfig.tiny(layer_module="LlamaDecoderLayer")
    lm = rand_lm(cfg, 0)
    x, pos = torch.randn(4, cfg.hidden_size), torch.arange(4)
    with pytest.raises(ValueError, match=r"must be packed \[n, 64\]"): lm.model(x[None], pos, AttnPlan.single(4))
    with pytest.raises(TypeError, match="plan must be an AttnPlan"): lm.model(x, pos, [4])
    with pytest.raises(ValueError, match="got 1 caches for 2 sequences"):
        lm.model(x, pos, AttnPlan.batch([2, 2]), caches=[KVCache(2)])
    with pytest.raises(ValueError, match="update_cache=True needs caches"): lm.model(x, pos, AttnPlan.single(4), update_cache=True)
    c = KVCache(2)
    with pytest.raises(RuntimeError, match="boom"): _boom(lm, x, pos, c)  # a failing forward leaves the cache as it was
    assert len(c) == 0


def _boom(lm, x, pos, cache):
    "Run a forward whose last layer fails, with update_cache=True."
    last = lm.model.layers[-1]
    orig = last.forward
    def fail(*a, **k): raise RuntimeError("boom")
    last.forward = fail
    try: lm.model(x, pos, AttnPlan.single(4), caches=[cache], update_cache=True)
    finally: last.forward = orig
