"""bagel.data: readers on the official formats, the mix, sharding, resume (DataLoader 0 and 2 workers), forward_train."""
import json, random, warnings
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from bagel.data import (DataMix, DataStatus, EditReader, MalformedRow, PackedDataset, SampleDataset, ShardedStream,
                        T2IReader, VLMReader, load_registry, write_toy_dataset, _png)
from bagel.model import BagelConfig
from bagel.packing import PackConfig, unpack
from bagel.transforms import ImageTransform

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from bagel.checkpoint import load_tokenizer, special_tokens
    from bagel.testing import write_tiny_tokenizer
    root = tmp_path_factory.mktemp("data")
    tok = load_tokenizer(write_tiny_tokenizer(root / "tok"))
    return dict(root=root, tok=tok, tokens=special_tokens(tok), clean=write_toy_dataset(root / "clean", n=6),
                broken=write_toy_dataset(root / "broken", n=6, broken=True))

def pcfg(tokens, **kw):
    return PackConfig.from_model(BagelConfig.tiny(tokens=tokens), **dict(expected_num_tokens=200, max_num_tokens=256,
                                 max_num_tokens_per_sample=200, prefer_buffer_before=128, max_buffer_size=4) | kw)

def test_t2i_caption_choice(env):
    r = T2IReader("t", env["clean"].parent / "t2i", env["tok"], env["tokens"], ImageTransform(64, 32, 16))
    row = {"image": _png((1, 2, 3), (40, 20)), "captions": json.dumps({"a": "red circle", "b": "blue square"})}
    got = Counter(env["tok"].decode(r.to_sample(row, random.Random(i))[0].ids) for i in range(400))
    assert set(got) == {"red circle", "blue square"} and min(got.values()) > 150
    items = r.to_sample({"image": row["image"], "captions": "{}"}, random.Random(0))
    assert items[0].ids == env["tok"].encode(" ") and items[1].loss and tuple(items[1].image.shape) == (3, 32, 64)
    assert sum(1 for u in r.units() for _ in r.rows(u)) == 12

def test_edit_branches(env):
    r = EditReader("e", env["clean"].parent / "editing", env["tok"], env["tokens"], ImageTransform(64, 32, 16), ImageTransform(32, 16, 4))
    chain = {"image_list": [_png((i, i, i), (32, 32)) for i in range(5)], "instruction_list": [[f"step {k}"] for k in range(4)]}
    joined = stepwise2 = 0
    for i in range(600):
        items = r.to_sample(chain, random.Random(i))
        texts = [env["tok"].decode(it.ids) for it in items if it.type == "text"]
        kinds = [(it.type, bool(it.loss)) for it in items]
        assert kinds[:2] == [("vae_image", False), ("vit_image", False)] and kinds[-1] == ("vae_image", True)
        assert all(it.enable_cfg for it in items if not it.loss)
        if len(texts) == 1 and texts[0].count(".") >= 1:
            joined += 1
            assert texts[0].endswith(".") and not texts[0].endswith(" ")
        if len(texts) == 2:
            stepwise2 += 1
            assert kinds == [("vae_image", False), ("vit_image", False), ("text", False), ("vae_image", True),
                             ("vae_image", False), ("vit_image", False), ("text", False), ("vae_image", True)]
            assert torch.equal(items[3].image, items[4].image)        # the intermediate target and its clean copy
    # P(span 2) = 1/2 (minus the chain end); half of those join: ~1/4 - a bit, the rest step by step
    assert 0.15 < joined / 600 < 0.3 and 0.15 < stepwise2 / 600 < 0.3

def test_vlm_reader(env):
    d = env["clean"].parent / "vlm"
    r = VLMReader("v", d / "images", env["tok"], env["tokens"], d / "toy.jsonl", ImageTransform(32, 16, 4))
    samples = [r.to_sample(raw, random.Random(0)) for u in r.units() for _, raw in r.rows(u)]
    assert sum(s is None for s in samples) == 1                        # the line without a gpt turn
    s = next(s for s in samples if s)
    assert [(it.type, bool(it.loss)) for it in s] == [("vit_image", False), ("text", False), ("text", True)]
    shuffled = VLMReader("v", d / "images", env["tok"], env["tokens"], d / "toy.jsonl", ImageTransform(32, 16, 4),
                         num_used_data=5, shuffle_lines=True, shuffle_seed=0)
    assert len(shuffled.units()) == 5 and shuffled.lines != r.lines[:5]

def test_malformed_rows_skipped_and_counted(env):
    mix = DataMix.from_yaml(env["broken"])
    for g, bad in [("t2i_pretrain", 2), ("unified_edit", 1), ("vlm_sft", 2)]:
        st = ShardedStream(mix.readers(g, env["tok"]), g, data_seed=0)
        n_rows = sum(1 for r in st.readers for u in r.units() for _ in r.rows(u))
        n_good = n_rows - bad - (1 if g == "vlm_sft" else 0)      # the toy VLM file has one line without loss
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            got = [next(st) for _ in range(n_good + 1)]            # one epoch and one sample of the next
        msgs = [str(w.message) for w in ws]
        places = {m.split("(", 1)[1].split(")")[0] for m in msgs}
        assert len(places) == bad and st.num_malformed == len(msgs) >= bad, g
        assert all("skipping malformed row" in m for m in msgs)
        assert all(("row group" in m) if g != "vlm_sft" else (" line " in m) for m in msgs)
        assert len({x.key for x in got[:n_good]}) == n_good
        strict = ShardedStream(mix.readers(g, env["tok"]), g, data_seed=0, strict=True)
        with pytest.raises(MalformedRow, match="malformed row"):
            for _ in range(n_rows): next(strict)

def test_unreadable_unit_and_empty_group(env, tmp_path):
    mix_path = write_toy_dataset(tmp_path / "d", n=4)
    (tmp_path / "d/t2i/part-0.parquet").write_bytes(b"not parquet")
    st = ShardedStream(DataMix.from_yaml(mix_path).readers("t2i_pretrain", env["tok"]), "t2i_pretrain", data_seed=0)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        got = [next(st) for _ in range(6)]
    assert any("unreadable unit" in str(w.message) for w in ws) and all("part-1" in s.key for s in got)
    (tmp_path / "d/t2i/part-1.parquet").write_bytes(b"not parquet either")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = ShardedStream(DataMix.from_yaml(mix_path).readers("t2i_pretrain", env["tok"]), "t2i_pretrain", data_seed=0)
        with pytest.raises(RuntimeError, match="no usable sample"): next(st)

def test_registry_and_mix_errors(env, tmp_path):
    reg = load_registry(env["clean"].parent / "dataset_info.yaml")
    assert Path(reg["t2i_pretrain"]["toy_t2i"]["data_dir"]).is_dir()
    # absolute paths are kept
    absreg = {"vlm_sft": {"x": {"data_dir": str(env["clean"].parent / "vlm/images"), "jsonl_path": str(env["clean"].parent / "vlm/toy.jsonl")}}}
    (tmp_path / "dataset_info.yaml").write_text(yaml.safe_dump(absreg))
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"vlm_sft": {"dataset_names": ["x"], "weight": 1}}))
    mix = DataMix.from_yaml(tmp_path / "mix.yaml")
    assert len(mix.readers("vlm_sft", env["tok"])[0].units()) == 12
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"t2i_pretrain": {"dataset_names": ["x"]}}))
    with pytest.raises(ValueError, match="unknown group 't2i_pretrain'; known groups: vlm_sft"): DataMix.from_yaml(tmp_path / "mix.yaml")
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"vlm_sft": {"dataset_names": ["x"], "num_used_data": [1, 2]}}))
    with pytest.raises(ValueError, match="one entry per dataset"): DataMix.from_yaml(tmp_path / "mix.yaml")
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"vlm_sft": {"dataset_names": ["x"], "colour": "red"}}))
    with pytest.raises(ValueError, match="unknown key"): DataMix.from_yaml(tmp_path / "mix.yaml").readers("vlm_sft", env["tok"])

def test_ranks_disjoint_and_workers(env):
    mix = DataMix.from_yaml(env["clean"])
    readers = mix.readers("vlm_sft", env["tok"])
    place = lambda s: s.key.rsplit(":e", 1)[0]
    per_rank = []
    for rank in range(3):
        st = ShardedStream(readers, "vlm_sft", rank=rank, world_size=3, data_seed=5)
        per_rank.append([place(next(st)) for _ in range(len(st.units) - 1)])
    sets = [set(p) for p in per_rank]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    # workers of one rank split it; inside DataLoader workers the order is reversed
    w0 = ShardedStream(readers, "vlm_sft", worker=0, num_workers=2, data_seed=5)
    w1 = ShardedStream(readers, "vlm_sft", worker=1, num_workers=2, data_seed=5, in_worker=True)
    assert not set(w0.units) & set(w1.units) and len(w0.units) == len(w1.units) == 6
    assert ShardedStream(readers, "vlm_sft", worker=1, num_workers=2, data_seed=5).units == w1.units[::-1]
    assert ShardedStream(readers, "vlm_sft", data_seed=6).units != ShardedStream(readers, "vlm_sft", data_seed=5).units

def _by_worker(items, key):
    out = defaultdict(list)
    for x in items: out[key(x)].append(x)
    return out

@pytest.mark.parametrize("workers", [0, 2])
def test_sample_dataset_resume(env, workers):
    mix = DataMix.from_yaml(env["clean"])
    make = lambda: SampleDataset(mix.readers("vlm_sft", env["tok"]), "vlm_sft", data_seed=3)
    loader = lambda ds: DataLoader(ds, batch_size=None, num_workers=workers)
    status, got = DataStatus(), []
    for s in loader(make()):
        got.append(status.update(s))
        if len(got) == 8: saved = status.state_dict()
        if len(got) == 20: break
    ds = make(); ds.load_state_dict(saved)
    again = [s for s, _ in zip(loader(ds), range(12))]
    a, b = _by_worker(got[8:], lambda s: s.index["worker"]), _by_worker(again, lambda s: s.index["worker"])
    for w in b:
        n = min(len(a[w]), len(b[w]))
        assert n >= 4 and [s.key for s in a[w][:n]] == [s.key for s in b[w][:n]]
        assert all(torch.equal(x.items[0].image, y.items[0].image) for x, y in zip(a[w][:n], b[w][:n]))
    if workers == 2: assert set(b) == {0, 1}

@pytest.mark.parametrize("workers", [0, 2])
def test_packed_dataset_resume(env, workers):
    mix = DataMix.from_yaml(env["clean"])
    cfg = pcfg(env["tokens"], pad_to_max=True)
    loader = lambda ds: DataLoader(ds, batch_size=None, num_workers=workers)
    status, got = DataStatus(), []
    for b in loader(PackedDataset(mix, env["tok"], cfg, data_seed=1)):
        got.append(status.update(b))
        if len(got) == 4: saved = status.state_dict()
        if len(got) == 10: break
    ds = PackedDataset(mix, env["tok"], cfg, data_seed=1); ds.load_state_dict(saved)
    again = [b for b, _ in zip(loader(ds), range(6))]
    wk = lambda b: b.batch_data_indexes["worker"]
    a, b = _by_worker(got[4:], wk), _by_worker(again, wk)
    assert set(b) == ({0, 1} if workers else {0})
    for w in b:
        for x, y in zip(a[w], b[w]):
            assert x.sample_lens == y.sample_lens and torch.equal(x.packed_text_ids, y.packed_text_ids)
            assert torch.equal(x.packed_timesteps, y.packed_timesteps) and torch.equal(x.padded_images, y.padded_images)
    for x in got: assert sum(x.sample_lens) == 256 and x.sequence_length <= 256
    nodrop = pcfg(env["tokens"], text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0, vae_cond_dropout_prob=0.0)
    for x, _ in zip(PackedDataset(mix, env["tok"], nodrop, data_seed=2), range(4)):
        assert x.attn_modes[:2] == ["causal", "noise"]              # the mandatory T2I sample opens each pack

def test_forward_train_on_reader_batch(env, tmp_path):
    from bagel.checkpoint import from_pretrained
    from bagel.testing import write_tiny_checkpoint
    bundle = from_pretrained(write_tiny_checkpoint(tmp_path / "model"), dtype=torch.float32)
    mix = DataMix.from_yaml(env["clean"])
    mix.groups["vlm_sft"].is_mandatory = True                      # every pack: a T2I and a VLM sample, then the mix
    ds = PackedDataset(mix, bundle.tokenizer, pcfg(bundle.config.tokens), data_seed=0)
    batch = next(iter(ds))
    groups = [[it.type for it in s.items] for s in unpack(batch, pcfg(bundle.config.tokens))]
    assert len(batch.packed_vit_token_indexes) and len(batch.mse_loss_indexes) and len(batch.ce_loss_indexes), groups
    g = torch.Generator().manual_seed(0)
    batch.encode_images(bundle.vae, generator=g)
    out = bundle.model.forward_train(batch, generator=g)
    V = bundle.config.llm.vocab_size
    assert out.ce_logits.shape == (len(batch.ce_loss_indexes), V) and torch.isfinite(out.ce_logits).all()
    assert out.velocity_pred.shape == out.velocity_target.shape == (len(batch.mse_loss_indexes), bundle.config.patch_latent_dim)
    ce = torch.nn.functional.cross_entropy(out.ce_logits, batch.packed_label_ids)
    mse = (out.velocity_pred - out.velocity_target).pow(2).mean()
    (ce + mse).backward()
    assert torch.isfinite(ce) and torch.isfinite(mse)
    assert bundle.model.language_model.lm_head.weight.grad is not None
