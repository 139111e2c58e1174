"""bagel.checkpoint: the 7B layout, round trips, size inference, and bad model dirs."""
import json, shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel.checkpoint import (AE_WEIGHTS, LLM_CONFIG, VIT_CONFIG, WEIGHTS, CheckpointError, config_from_dir,
                              from_pretrained, read_header, save_pretrained)
from bagel.model import Bagel, BagelConfig
from bagel.testing import write_tiny_checkpoint
from bagel.vae import AutoEncoder, VAEConfig
from conftest import reference_keys

def test_7b_preset_has_the_released_names_and_shapes():
    with torch.device("meta"):
        model, vae = Bagel(BagelConfig.bagel_7b_mot()), AutoEncoder(VAEConfig.flux())
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    ref = list(reference_keys("BAGEL_7B_ema_keys.tsv").items())
    assert len(ref) == 1223
    assert dict(ours) == dict(ref)
    assert ours == ref  # the file's order too
    assert sum(v.numel() for v in model.state_dict().values()) == 14_607_260_128
    assert [(k, tuple(v.shape)) for k, v in vae.state_dict().items()] == list(reference_keys("BAGEL_ae_keys.tsv").items())

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")

def _equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa: assert torch.equal(sa[k], sb[k]), k

def test_round_trip_and_dtypes(tiny, tmp_path):
    b = from_pretrained(tiny, dtype=torch.float32)
    save_pretrained(b, tmp_path / "copy")
    _equal_state(b.model, from_pretrained(tmp_path / "copy", dtype=torch.float32).model)
    bf = from_pretrained(tiny, dtype=torch.bfloat16)
    assert {p.dtype for p in bf.model.parameters()} == {torch.bfloat16}
    assert bf.vae.encoder.conv_in.weight.dtype == torch.float32  # the VAE stays fp32 unless asked
    rope = bf.model.language_model.model.rotary_emb.inv_freq
    assert rope.dtype == torch.float32 and not rope.is_meta

def test_missing_position_tables_are_recomputed_exactly(tiny, tmp_path):
    d = tmp_path / "no_tables"; shutil.copytree(tiny, d)
    sd = load_file(d / WEIGHTS)
    full = {k: sd.pop(k) for k in ["latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"]}
    save_file(sd, d / WEIGHTS)
    b = from_pretrained(d, dtype=torch.float32, max_latent_size=16)
    assert torch.equal(b.model.latent_pos_embed.pos_embed, full["latent_pos_embed.pos_embed"])
    assert torch.equal(b.model.vit_pos_embed.pos_embed, full["vit_pos_embed.pos_embed"])

def test_sizes_are_read_off_the_tensors(tmp_path):
    "A model dir of another size loads without telling the loader anything."
    cfg = BagelConfig.tiny(max_latent_size=8, vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2))
    d = write_tiny_checkpoint(tmp_path / "other", cfg=cfg)
    got = config_from_dir(d)
    assert (got.max_latent_size, got.vae.ch_mult, got.vae.num_res_blocks) == (8, (1, 2, 2, 2), 2)
    assert got.vit.num_hidden_layers == cfg.vit.num_hidden_layers  # file keeps one more; the override drops it
    assert json.loads((d / VIT_CONFIG).read_text())["num_hidden_layers"] == cfg.vit.num_hidden_layers + 1

def _broken(tiny, tmp_path, edit):
    d = tmp_path / "broken"; shutil.copytree(tiny, d); edit(d); return d

def _edit_weights(fn):
    def edit(d):
        sd = load_file(d / WEIGHTS); fn(sd); save_file(sd, d / WEIGHTS)
    return edit

@pytest.mark.parametrize("edit,message", [
    (_edit_weights(lambda sd: sd.pop("language_model.lm_head.weight")), "missing tensors: language_model.lm_head.weight"),
    (_edit_weights(lambda sd: sd.update(extra=torch.zeros(1))), "unexpected tensors: extra"),
    (_edit_weights(lambda sd: sd.update({"llm2vae.weight": torch.zeros(64, 7)})), "llm2vae.weight file (64, 7) vs model (64, 64)"),
    (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-100]), "ema.safetensors is truncated"),
    (lambda d: (d / AE_WEIGHTS).write_bytes(b"\x00" * 64), "ae.safetensors is not a valid safetensors file"),
    (lambda d: (d / LLM_CONFIG).write_text(json.dumps({**json.loads((d / LLM_CONFIG).read_text()), "hidden_size": 128})),
     "does not match the model built from its config"),
    (lambda d: (d / VIT_CONFIG).unlink(), "vit_config.json is missing"),
    (lambda d: (d / "vocab.json").unlink() or (d / "tokenizer.json").unlink(), "has no tokenizer"),
])
def test_bad_model_dirs_give_named_errors(tiny, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=None) as e:
        from_pretrained(_broken(tiny, tmp_path, edit), dtype=torch.float32)
    assert message in str(e.value), str(e.value)

def test_not_a_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not a BAGEL model dir"):
        from_pretrained(tmp_path)

def test_read_header_reports_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_header(tmp_path / "nope.safetensors")

def test_download_fails_fast_and_says_what_to_do(tmp_path):
    "Without the Hub (offline mode here), download_bagel raises at once with the way out."
    import os, subprocess, sys, time
    code = ("from bagel.checkpoint import download_bagel\n"
            f"try: download_bagel({str(tmp_path / 'dl')!r})\n"
            "except RuntimeError as e: print('ERR', e)\n")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    assert time.time() - t0 < 60
    assert out.startswith("ERR could not download ByteDance-Seed/BAGEL-7B-MoT") and "pass its path as model_dir" in out
