"""Packing efficiency and packer throughput on one CPU core.

Efficiency = real tokens / padded tokens, with every pack padded to `max_num_tokens` for flex attention.
Throughput = packed tokens per second: end to end (read parquet/JSONL, decode, resize, pack) and pack only
(samples already in memory). Strides are the 7B model's (VAE 16 px per latent token, ViT 14 px patches).

    python -m bench.bench_packing [--mix path/to/mix.yaml] [--packs 40]

Without `--mix` it uses ShapesWorld (`bagel.shapesworld`) when that module can write a mix, else the toy mix of
`bagel.data.write_toy_dataset` with 7B-like transform arguments.
"""
import argparse, tempfile, time, warnings
from dataclasses import replace
from pathlib import Path

import torch
import yaml

def default_mix(root: Path) -> tuple:
    "A mix.yaml to measure on, and its name."
    try:
        from bagel.shapesworld import write_shapesworld
        out = write_shapesworld(root, n_t2i=600, n_edit=300, n_vlm=600, size=256, rows_per_file=100, row_group_size=25)
        return Path(out["mix"]), "ShapesWorld mix (write_shapesworld: 600 T2I, 300 edit, 600 VLM, 256 px)"
    except ImportError:
        pass
    from bagel.data import write_toy_dataset
    mix_path = write_toy_dataset(root, n=48)
    mix = yaml.safe_load(mix_path.read_text())
    vae, vit = {"image_stride": 16, "max_image_size": 256, "min_image_size": 128}, {"image_stride": 14, "max_image_size": 224, "min_image_size": 112}
    mix["t2i_pretrain"]["image_transform_args"] = mix["unified_edit"]["image_transform_args"] = vae
    mix["unified_edit"]["vit_image_transform_args"] = mix["vlm_sft"]["image_transform_args"] = vit
    mix_path.write_text(yaml.safe_dump(mix))
    return mix_path, "toy mix (write_toy_dataset, n=48)"

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mix", type=Path, default=None)
    ap.add_argument("--packs", type=int, default=40)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from bench.common import report
    from bagel.checkpoint import load_tokenizer, special_tokens
    from bagel.data import DataMix, PackedDataset
    from bagel.packing import PackConfig, pack_samples
    from bagel.testing import write_tiny_tokenizer
    tmp = Path(tempfile.mkdtemp())
    mix_path, mix_name = (a.mix, str(a.mix)) if a.mix else default_mix(tmp / "data")
    tok = load_tokenizer(write_tiny_tokenizer(tmp / "tok")); tokens = special_tokens(tok)
    mix = DataMix.from_yaml(mix_path)
    warnings.simplefilter("ignore")
    rows = []
    for exp, mx in [(7168, 8192), (8192, 8192), (32768, 36864), (36864, 36864)]:
        cfg = PackConfig.bagel_7b(tokens=tokens, expected_num_tokens=exp, max_num_tokens=mx,
                                  max_num_tokens_per_sample=min(mx, 16384), prefer_buffer_before=mx // 2, pad_to_max=True)
        it = iter(PackedDataset(mix, tok, cfg, data_seed=0))
        next(it)                                                        # warm-up: file handles, first decode
        t0 = time.perf_counter(); packs = [next(it) for _ in range(a.packs)]; e2e = time.perf_counter() - t0
        real = sum(p.sequence_length for p in packs); padded = sum(sum(p.sample_lens) for p in packs)
        # pack only: the same samples again, from memory
        from bagel.data import ShardedStream
        streams = {g: ShardedStream(mix.readers(g, tok, tokens), g, data_seed=0) for g in mix.groups}
        samples = [next(streams[g]) for _ in range(60) for g in streams]
        plain = replace(cfg, pad_to_max=False, max_num_tokens=10**7, expected_num_tokens=10**7, max_num_tokens_per_sample=10**7)
        n_tok = pack_samples(samples, plain).sequence_length
        t0 = time.perf_counter(); reps = 5
        for r in range(reps): pack_samples(samples, plain, seed=r)
        pack_only = n_tok * reps / (time.perf_counter() - t0)
        rows.append([exp, mx, a.packs, f"{real / padded:.2%}", round(real / e2e), round(pack_only)])
    report("Packing efficiency and packer throughput (bench_packing)",
           ["expected_num_tokens", "max_num_tokens", "packs", "efficiency (real/padded)", "end-to-end tok/s (1 core)", "pack-only tok/s (1 core)"],
           rows, notes=f"Data: {mix_name}. 7B strides, trainer CFG dropout (0.1/0.3/0.3), buffer 50, prefer_buffer_before = max/2, "
                       f"flex pad to max_num_tokens. End to end = parquet/JSONL read + decode + resize + pack, one process, torch 1 thread.")

if __name__ == "__main__":
    main()
