"""One rank of a CPU training run for tests/test_train.py: alone (`python tests/train_worker.py ...`) or under
torchrun (`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_worker.py ...`)."""
import argparse, json, os, signal

import torch

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="TrainConfig fields as JSON")
    ap.add_argument("--model", default="tiny", help="'tiny' (BagelConfig.tiny) or a model dir")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic batches")
    ap.add_argument("--kill_at", type=int, default=0, help="SIGKILL this process right after that optimizer step")
    ap.add_argument("--dump", default="", help="rank 0 saves full model, EMA and history here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from bagel.checkpoint import config_from_dir
    from bagel.distributed import init_distributed
    from bagel.model import BagelConfig
    from bagel.train import SyntheticBatches, TrainConfig, train
    rank, world = init_distributed()
    cfg = TrainConfig.from_dict(json.loads(a.config))
    bcfg = BagelConfig.tiny() if a.model == "tiny" else config_from_dir(a.model)
    kill = (lambda step, rec: os.kill(os.getpid(), signal.SIGKILL) if step == a.kill_at else None)
    res = train(cfg, bcfg if a.model == "tiny" else a.model, lambda r, w: SyntheticBatches(bcfg, seed=a.seed, rank=r),
                callbacks=(kill,) if a.kill_at else ())
    if a.dump:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        msd = get_model_state_dict(res.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        ema = res.ema.full_state_dict()                        # a collective: every rank calls it
        if rank == 0: torch.save({"model": msd, "ema": ema, "history": res.history, "world": world}, a.dump)
    if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
