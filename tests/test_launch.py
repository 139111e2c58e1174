"""submitit launches of the training recipe: a local job with 2 tasks trains, and a second job resumes it."""
from pathlib import Path

import pytest
import yaml

from bagel.cli import train_from_config
from bagel.launch import LaunchConfig, launch
from bagel.train import read_metrics

def _recipe(tmp: Path, total_steps: int) -> Path:
    cfg = {"out": str(tmp / "run"), "n_t2i": 40, "n_edit": 20, "n_vlm": 40, "rows_per_file": 10, "row_group_size": 5,
           "vae_steps": 3, "vae_batch_size": 4,
           "expected_num_tokens": 480, "max_num_tokens": 512,
           "train": {"total_steps": total_steps, "warmup_steps": 1, "log_every": 1, "save_every": 2, "progress": False,
                     "auto_resume": True, "sharding_strategy": "NO_SHARD", "mixed_precision": "fp32"}}
    path = tmp / f"recipe_{total_steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path

@pytest.mark.slow
def test_local_two_task_job_trains_then_resumes(tmp_path):
    lc = LaunchConfig(cluster="local", tasks_per_node=2, folder=str(tmp_path / "submitit"), timeout_min=10)
    res = launch(train_from_config, _recipe(tmp_path, 2), cfg=lc).results()
    assert Path(res[0]).joinpath("ema.safetensors").exists() and res[1] == ""       # rank 0 exports the EMA model dir
    ckpts = sorted(p.name for p in (tmp_path / "run" / "run" / "checkpoints").iterdir())
    assert ckpts[-1].endswith("0000002")
    launch(train_from_config, _recipe(tmp_path, 4), cfg=lc).results()               # a longer schedule: auto-resume
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "run")]
    assert steps == [1, 2, 3, 4]                                                       # continued, nothing repeated
