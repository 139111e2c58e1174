"""bagel.multigpu: CFG-parallel over 2 and 3 gloo processes equals the single-process sampler (text-to-image and
editing, fp32 tiny checkpoint, same seed; also over a subgroup); the layer split on CPU and, with GPUs, across two of them.

Run alone, this file is the worker of one rank: `python -m torch.distributed.run --nproc_per_node 2
tests/test_multigpu.py MODEL_DIR OUT.pt`."""
import os, subprocess, sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red square on a blue field", "two green circles"]

def photos():
    "Two small RGB images of different sizes, the editing inputs."
    from PIL import Image
    g = torch.Generator().manual_seed(3)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in [(40, 56), (64, 48)]]

def jobs():
    "(name, gen_image keyword arguments) of the runs compared."
    s = dict(num_timesteps=5, cfg_interval=(0.3, 1.0), cfg_renorm_type="global", cfg_text_scale=4.0, cfg_img_scale=1.5)
    return [("t2i", s | dict(images=None, image_shapes=[(32, 48), (48, 32)])),
            ("edit", s | dict(images=photos(), cfg_renorm_type="text_channel", cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)))]

def sampling_of(kw):
    from bagel.sampling import SamplingConfig
    return SamplingConfig(num_timesteps=kw["num_timesteps"], cfg_interval=kw["cfg_interval"], cfg_renorm_type=kw["cfg_renorm_type"])

def worker(model_dir: str, out: str):
    "One rank: CFG-parallel sampling of every job over all ranks and, with 3 ranks, over the subgroup {0, 1} too."
    torch.set_num_threads(1)
    from bagel.distributed import init_distributed
    from bagel.inferencer import Inferencer
    from bagel.multigpu import gen_image_cfg_parallel
    rank, world = init_distributed(os.environ.get("BAGEL_TEST_BACKEND"))
    dev = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    inf = Inferencer.from_pretrained(model_dir, dtype=torch.float32, device=dev)
    groups = {world: None}
    if world == 3: groups[2] = torch.distributed.new_group([0, 1])          # every rank takes part in new_group
    res = {}
    for W, group in groups.items():
        if rank >= W: continue
        for name, kw in jobs():
            xs = gen_image_cfg_parallel(inf, PROMPTS, images=kw["images"], image_shapes=kw.get("image_shapes", (1024, 1024)),
                                        cfg_text_scale=kw["cfg_text_scale"], cfg_img_scale=kw["cfg_img_scale"],
                                        sampling=sampling_of(kw), generator=torch.Generator().manual_seed(11),
                                        group=group, decode=False)
            res[W, name] = [x.cpu() for x in xs]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, res)
    if rank == 0: torch.save({"world": world, "ranks": gathered}, out)
    torch.distributed.destroy_process_group()

# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from bagel.testing import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny")

def reference(model_dir, device="cpu") -> dict:
    "Final latents of the single-process Inferencer.gen_image for every job."
    from bagel.inferencer import Inferencer
    inf = Inferencer.from_pretrained(model_dir, dtype=torch.float32, device=device)
    out = {}
    for name, kw in jobs():
        box = {}
        cb = lambda i, n, x: box.update(x=[t.clone() for t in x]) if i == n else None
        inf.gen_image(PROMPTS, generator=torch.Generator().manual_seed(11), callback=cb, progress=False, **kw)
        out[name] = [t.cpu() for t in box["x"]]
    return out

def launch(model_dir, out, nproc: int):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        __file__, str(model_dir), str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out, weights_only=False)

@pytest.mark.slow
def test_cfg_parallel_equals_single_process(model_dir, tmp_path):
    """3 gloo ranks (a branch each) and the subgroup of ranks 0, 1 (rank 0: cond + img): every rank ends with the
    single-process latents (to 1e-5, fp32), for text-to-image and editing."""
    got = launch(model_dir, tmp_path / "out.pt", 3)
    ref = reference(model_dir)
    assert got["world"] == 3 and [sorted(r) for r in got["ranks"]] == [sorted((W, n) for W in (2, 3) for n in ref)] * 2 + [
        sorted((3, n) for n in ref)]
    for res in got["ranks"]:
        for (W, name), xs in res.items():
            assert [x.shape for x in xs] == [x.shape for x in ref[name]], name
            for a, b in zip(xs, ref[name]):
                assert (a - b).abs().max().item() < 1e-5, (W, name, (a - b).abs().max().item())
    assert (ref["t2i"][0] - ref["edit"][0][: ref["t2i"][0].shape[0]]).abs().max() > 1e-3    # the jobs differ

def test_layer_split_cpu_and_errors():
    "Two 'cpu' devices, one layer each: logits and velocities identical to the unsplit model; bad inputs refused."
    import copy
    from bagel.model import Bagel, BagelConfig
    from bagel.multigpu import plan_split, split_layers_, unsplit_
    from bagel.testing import init_random_
    m = init_random_(Bagel(BagelConfig.tiny(llm=BagelConfig.tiny().llm.__class__.tiny(vocab_size=512, num_hidden_layers=4))).eval(),
                     torch.Generator().manual_seed(0))
    ref = copy.deepcopy(m)
    home = plan_split(m, ["cpu"]).home_nbytes
    layer = sum(p.numel() * 4 for p in m.language_model.model.layers[0].parameters())
    plan = split_layers_(m, ["cpu", "cpu", "cpu"], max_memory=[home + layer, 2 * layer, layer])  # only fits 1 | 2 | 1
    assert plan.layer_device == [0, 1, 1, 2]
    def run(net):
        c = [net.new_context()]
        net.extend_vae(c, [torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(1))])
        lg = net.extend_text(c, [[1, 9, 8, 2]], return_logits=True)
        v = net.velocity(c, [torch.randn(16, 64, generator=torch.Generator().manual_seed(2))], 0.5, [(4, 4)])
        return lg, v[0]
    (a, va), (b, vb) = run(m), run(ref)
    assert torch.equal(a, b) and torch.equal(va, vb)
    with pytest.raises(ValueError, match="do not fit max_memory"): plan_split(m, ["cpu", "cpu"], max_memory=[1, 1])
    with pytest.raises(TypeError, match="non-empty list"): plan_split(m, [])
    assert unsplit_(m)._split_hooks == []

@pytest.mark.multigpu
def test_layer_split_two_gpus_matches_one():
    "The tiny model split over cuda:0 and cuda:1 (hidden states and caches cross) matches it on cuda:0."
    import copy
    from bagel.model import Bagel, BagelConfig
    from bagel.multigpu import plan_split, split_layers_
    from bagel.testing import init_random_
    m = init_random_(Bagel(BagelConfig.tiny()).eval(), torch.Generator().manual_seed(0))
    ref = copy.deepcopy(m).to("cuda:0")
    home = plan_split(m, ["cpu"]).home_nbytes
    plan = split_layers_(m, ["cuda:0", "cuda:1"], max_memory=[home + 1, None])   # both layers on cuda:1
    assert plan.layer_device == [1, 1] and m.language_model.model.layers[0].mlp.up_proj.weight.device.index == 1
    def run(net):
        c = [net.new_context()]
        net.extend_text(c, [[1, 9, 8, 2]])
        assert c[0].cache.keys[0].device == net.language_model.model.layers[0].mlp.up_proj.weight.device
        return net.velocity(c, [torch.randn(16, 64, generator=torch.Generator().manual_seed(2))], 0.5, [(4, 4)])[0]
    assert (run(m) - run(ref)).abs().max().item() < 1e-5

@pytest.mark.multigpu
def test_cfg_parallel_two_gpus(model_dir, tmp_path):
    "NCCL, one rank per GPU: the latents match the single-GPU sampler."
    got = launch(model_dir, tmp_path / "out.pt", 2)
    ref = reference(model_dir, "cuda:0")
    for name, xs in ref.items():
        for a, b in zip(got["ranks"][0][2, name], xs): assert (a - b).abs().max().item() < 1e-4, name

if __name__ == "__main__":
    worker(*sys.argv[1:3])
