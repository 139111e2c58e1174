"""bagel.inferencer: the contexts of spec §7.2 (incl. think mode), text decoding, callbacks, batching, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from bagel.inferencer import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT, Inferencer
from bagel.testing import write_tiny_checkpoint

FAST = dict(num_timesteps=4, progress=False)

@pytest.fixture(scope="module")
def inf(tmp_path_factory):
    return Inferencer.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny"), dtype=torch.float32)

def _blk(inf, text): return len(inf.model.text_block(inf.tokenizer.encode(text)))

def _capture(inf, monkeypatch):
    "Record the prompts gen_image hands to the sampler (and skip sampling)."
    seen = {}
    def fake(prompts, shapes, *a, **k):
        seen["prompts"], seen["shapes"] = prompts, shapes
        return [Image.new("RGB", (s[1], s[0])) for s in shapes]
    monkeypatch.setattr(inf, "generate_from", fake)
    return seen

def test_t2i_think_contexts(inf, monkeypatch):
    seen = _capture(inf, monkeypatch)
    _, thoughts = inf.gen_image("a red circle", image_shapes=(32, 32), think=True, max_think_tokens=5, return_think=True, **FAST)
    p = seen["prompts"][0]
    sys_n, prompt_n, think_n = _blk(inf, GEN_THINK_SYSTEM_PROMPT), _blk(inf, "a red circle"), _blk(inf, thoughts[0])
    assert len(p.text) == sys_n                            # [sys]
    assert len(p.img) == sys_n + prompt_n                  # [sys] prompt
    assert len(p.cond) == sys_n + prompt_n + think_n       # [sys] prompt think
    assert p.cond.rope == len(p.cond)                      # text only: one position per token

def test_edit_contexts_and_positions(inf, monkeypatch):
    seen = _capture(inf, monkeypatch)
    src = Image.new("RGB", (64, 48), (10, 200, 10))
    inf.gen_image("make it red", images=[src], **FAST)
    p = seen["prompts"][0]
    instr = _blk(inf, "make it red")
    assert len(p.img) == instr and p.img.rope == instr                      # [instruction]: no image slots
    assert len(p.cond) == len(p.text) + instr and p.cond.rope == 2 + instr  # Z and V take one position each
    assert seen["shapes"] == [(p.image_shape)] and p.image_shape == (128, 176)  # resized by the VAE rule

def test_understanding_think_prefix(inf, monkeypatch):
    "Think mode puts exactly the VLM system block before the image and question of the context decoding starts from."
    lens = []
    monkeypatch.setattr(inf, "gen_text", lambda ctxs, **k: lens.append(len(ctxs[0])) or [""])
    img = Image.new("RGB", (32, 32))
    inf.understand(img, "what is this?", think=False, max_length=3)
    inf.understand(img, "what is this?", think=True, max_length=3)
    assert lens[1] - lens[0] == _blk(inf, VLM_THINK_SYSTEM_PROMPT)

def test_gen_text_greedy_matches_a_manual_loop_and_leaves_context(inf):
    m, tk = inf.model, inf.config.tokens
    ctx = m.new_context(); m.extend_text([ctx], [m.text_block(inf.tokenizer.encode("count the circles"))])
    n = len(ctx)
    text = inf.gen_text([ctx], max_length=6)[0]
    assert len(ctx) == n                                   # decoding works on a fork
    probe, tok, ids = ctx.fork(), tk.bos_token_id, []
    for _ in range(6):
        tok = int(m.extend_text([probe], [[tok]], return_logits=True)[0].argmax())
        if tok == tk.eos_token_id: break
        ids.append(tok)
    assert text == inf.tokenizer.decode(ids).split("<|im_end|>")[0]

@pytest.mark.parametrize("fast", [False, True])
def test_prefix_rides_the_first_step(inf, fast, monkeypatch):
    "gen_text(prefix=...) prefills a block and <|im_start|> in one forward: the same answer as a block, then decoding."
    m = inf.model
    ctx = m.new_context(); m.extend_text([ctx], [m.text_block(inf.tokenizer.encode("two red squares"))])
    q = m.text_block(inf.tokenizer.encode("how many squares?"))
    n = len(ctx)
    merged = inf.gen_text([ctx, ctx], max_length=6, prefix=[q, q[:3]], fast=fast)
    assert len(ctx) == n                                   # still on forks
    for block, got in zip([q, q[:3]], merged):
        two = ctx.fork(); m.extend_text([two], [block])
        assert got == inf.gen_text([two], max_length=6, fast=fast)[0]
    one, two = ctx.fork(), ctx.fork()                      # the first step's logits, one forward vs two
    a = m.extend_text([one], [[*q, inf.config.tokens.bos_token_id]], return_logits=True)
    m.extend_text([two], [q]); b = m.extend_text([two], [[inf.config.tokens.bos_token_id]], return_logits=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    import bagel.fast
    built = []
    monkeypatch.setattr(bagel.fast, "StaticDecoder", lambda *a, **k: built.append(a) or pytest.fail("decoder built"))
    one_token = inf.gen_text([ctx], max_length=1, prefix=[q], fast=fast)[0]     # the prefill's token; no decoder is built
    assert merged[0].startswith(one_token) and not built
    with pytest.raises(ValueError, match="2 prefixes for 1 contexts"): inf.gen_text([ctx], prefix=[q, q])

def test_sampled_text_is_reproducible(inf):
    ctx = inf.model.new_context(); inf.model.extend_text([ctx], [inf.model.text_block([5, 6])])
    run = lambda s: inf.gen_text([ctx], max_length=8, do_sample=True, temperature=1.0, generator=torch.Generator().manual_seed(s))
    assert run(1) == run(1)

def test_callback_sees_every_step(inf):
    steps = []
    inf.gen_image("a blue square", image_shapes=(32, 32), num_timesteps=6, progress=False,
                  callback=lambda i, n, x: steps.append((i, n, tuple(x[0].shape))))
    assert [s[0] for s in steps] == [1, 2, 3, 4, 5] and steps[0][1:] == (5, (4, 64))

def test_batch_of_prompts_equals_single_calls(inf):
    noise = [torch.randn(4, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    prompts = ["a", "two blue squares", "a red circle left of a green triangle"]
    batch = inf.gen_image(prompts, image_shapes=(32, 32), noise=noise, **FAST)
    for p, n, b in zip(prompts, noise, batch):
        single = inf.gen_image(p, image_shapes=(32, 32), noise=[n], **FAST)[0]
        assert np.abs(np.asarray(single, dtype=int) - np.asarray(b, dtype=int)).max() <= 1

def test_noise_shape_is_checked(inf):
    with pytest.raises(ValueError, match="noise shapes"):
        inf.gen_image("x", image_shapes=(32, 32), noise=[torch.randn(5, 64)], **FAST)
