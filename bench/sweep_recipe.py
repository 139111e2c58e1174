"""Several ShapesWorld learning runs at once on one machine: one `bagel demo` process per run, one GPU each if it has enough.

The recipe's step on a GPU is bound by its host (a 32k-token step of the GPU config ran at ~4% MFU on an H200), so
even one device has room for more than one run. On a machine of several GPUs the runs take them in turn
(`CUDA_VISIBLE_DEVICES`; `--gpus` limits how many), so two runs on two GPUs are each a run made alone. Each run is

    bagel demo --config CONFIG --set out=OUT/NAME --set num_workers=W [--set KEY=VALUE ...]

pinned to its own share of the CPU cores (its DataLoader workers and intra-op threads stay inside it). The ShapesWorld
data is written once and linked into every run whose data settings agree; every run's data is written before the
first run starts, so runs side by side start together. When all runs have ended, one table of
their steps, final losses and ShapesWorld-Bench scores is appended to RESULTS.md. Runs that share a device also share
its time, so compare their steps, not only their scores, with a run made alone.

The same command again continues every run from its last checkpoint (`auto_resume`): a run longer than one session
of a machine is several calls, e.g. `--set train.max_seconds=420` in each and a `train.total_steps` for the whole.
Each call's table row has the run's steps and training seconds so far, and scores of its latest weights. `--finish`
sets each resumed run's `train.total_steps` so that its schedule ends inside this call's `train.max_seconds`: from
the checkpoint it resumes, at the seconds a step its training log shows up to there (the learning rate is computed
from the config each call, so a run still on a WSD schedule's flat part decays in this call). A call cut off after
its checkpoint, before its report, is finished from that checkpoint all the same.

    python -m bench.sweep_recipe --config configs/shapesworld_gpu.yaml --out runs/sweep \\
        --run base --run wsd train.lr_scheduler=wsd train.total_steps=3000 --run shift2 train.timestep_shift=2
"""
import argparse, hashlib, json, os, subprocess, sys, time
from dataclasses import replace
from pathlib import Path

COLUMNS = ["run", "overrides", "GPU", "steps", "train s", "s/step", "final ce", "final mse", "t2i", "edit", "vqa"]

def _parse_runs(runs: list) -> list:  # [[NAME, KEY=VALUE, ...], ...] -> [(name, [overrides])]
    out, seen = [], set()
    for name, *sets in runs:
        if "=" in name or "/" in name or name in seen:
            raise SystemExit(f"--run needs a new name first (no '=' or '/'), then KEY=VALUE overrides: got {name!r}")
        if bad := [s for s in sets if "=" not in s]: raise SystemExit(f"--run {name}: {bad} are not KEY=VALUE overrides")
        seen.add(name); out.append((name, sets))
    return out

FINISH_MARGIN = 0.97   # --finish plans for steps 3% slower than the earlier calls

def _finishing_steps(cfg, seconds: float) -> int | None:
    "total_steps that end a resumed run `seconds` of training from now, at its logged step time (None: no checkpoint)."
    from bagel.distributed import latest_checkpoint
    from bagel.train import read_metrics, window_seconds
    tcfg = cfg.train_config()
    if (ckpt := latest_checkpoint(tcfg.ckpt_dir)) is None: return None
    step = int(ckpt.name.removeprefix("step_"))     # where training resumes; logs past it are dropped on resume
    rows = [r for r in read_metrics(tcfg.results_dir) if r["step"] <= step and r.get("tokens_per_s")]
    if not rows:
        raise SystemExit(f"--finish: {cfg.out} has a checkpoint at step {step} but no logged step times in "
                         f"{Path(tcfg.results_dir) / 'metrics.jsonl'}; give this run train.total_steps yourself")
    per_step = sum(map(window_seconds, rows)) / rows[-1]["step"]
    return step + int(FINISH_MARGIN * seconds / per_step)

def _core_shares(n: int) -> list:  # -> n disjoint lists of CPU ids
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < n: return [cores] * n        # fewer cores than runs: they share all of them
    k = len(cores) // n
    return [cores[i * k:(i + 1) * k] for i in range(n)]

def _gpu_shares(n: int, gpus: int | None = None) -> list:  # -> n CUDA_VISIBLE_DEVICES values (None: leave it as it is)
    "The runs take the visible GPUs in turn; with one GPU or none they all keep the process's device."
    import torch
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in visible.split(",") if x.strip()] if visible is not None else \
          [str(i) for i in range(torch.cuda.device_count())]       # NVML count: no CUDA context in this process
    if gpus is not None:
        if not 1 <= gpus <= max(1, len(ids)): raise SystemExit(f"--gpus {gpus}: this machine shows {len(ids)} GPU(s)")
        ids = ids[:gpus]
    return [ids[i % len(ids)] for i in range(n)] if len(ids) > 1 else [None] * n

def _shared_data(cfg, data_root: Path, made: dict) -> Path:
    "The data folder of this run's data settings, written once for all runs that share them."
    from bagel.recipe import data_settings, make_data
    key = json.dumps(data_settings(cfg), sort_keys=True)
    if key not in made:    # named by its settings, so a later call with other runs finds (or makes) the same folder
        made[key] = data_root / f"data-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        make_data(replace(cfg, out=str(made[key])))
    return made[key] / "shapesworld"

def main(argv=None):
    from bagel.recipe import RecipeConfig
    from bench.common import RESULTS, device_name, report
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/shapesworld_gpu.yaml"))
    ap.add_argument("--run", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE ...]",
                    help="one run: a name, then its config overrides (repeat --run for each run)")
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"), help="one folder per run under this one")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers per run (default: its share of the cores less 2; 0 packs in the training process)")
    ap.add_argument("--gpus", type=int, default=None, help="use the first N visible GPUs, one run on each in turn (default: all)")
    ap.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default bench/RESULTS.md)")
    ap.add_argument("--finish", action="store_true", help="end each resumed run's schedule inside this call's train.max_seconds "
                    "(sets train.total_steps from its latest checkpoint and the step time logged up to it)")
    a = ap.parse_args(argv)
    runs, shares = _parse_runs(a.run), _core_shares(len(a.run))
    gpus = _gpu_shares(len(runs), a.gpus)
    a.out.mkdir(parents=True, exist_ok=True)
    planned = []
    for (name, sets), cores in zip(runs, shares):                        # every run's config, before any data is written
        workers = a.workers if a.workers is not None else max(1, len(cores) - 2)
        sets = [f"out={a.out / name}", f"num_workers={workers}"] + sets
        cfg = RecipeConfig.from_yaml(a.config, sets)                     # a bad override fails here, before any run starts
        if a.finish:
            secs = cfg.train_config().max_seconds
            if secs is None: raise SystemExit(f"--finish needs train.max_seconds for run {name} (the seconds this call trains)")
            if (total := _finishing_steps(cfg, secs)) is not None:
                sets.append(f"train.total_steps={total}"); cfg = RecipeConfig.from_yaml(a.config, sets)
        planned.append((name, sets, workers, cfg))
    made, procs, ncores = {}, [], len({c for share in shares for c in share})
    for *_, cfg in planned:            # all data first, on every core: the runs then start together and train alone
        link = Path(cfg.out) / "shapesworld"
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            data = _shared_data(replace(cfg, num_workers=ncores), a.out / "_data", made)   # workers: not a data setting
            link.symlink_to(data.resolve(), target_is_directory=True)
    for (name, sets, workers, cfg), cores, gpu in zip(planned, shares, gpus):
        cmd = [sys.executable, "-c", "import sys; from bagel.cli import main; sys.exit(main(sys.argv[1:]))",
               "demo", "--config", str(a.config)] + [x for s in sets for x in ("--set", s)]
        log = open(Path(cfg.out) / "log.txt", "a")                        # a resumed run's log continues
        log.write(f"== call {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd[3:])}\n"); log.flush()
        env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})
        procs.append((name, sets[2:], gpu, cfg, log, subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=(lambda c=cores: os.sched_setaffinity(0, c))
            if hasattr(os, "sched_setaffinity") else None)))
        print(f"started {name}: cores {cores[0]}-{cores[-1]}, {workers} data workers"
              f"{f', GPU {gpu}' if gpu is not None else ''}, {' '.join(sets[2:]) or 'no overrides'}", flush=True)
    t0, rows, failed = time.perf_counter(), [], []
    for name, sets, gpu, cfg, log, p in procs:
        rc = p.wait(); log.close()
        print(f"{name}: exit {rc} after {time.perf_counter() - t0:.0f} s (log: {Path(cfg.out) / 'log.txt'})", flush=True)
        rep = Path(cfg.out) / "report.json"
        if rc != 0 or not rep.exists(): failed.append(name); continue
        r = json.loads(rep.read_text())
        m, last, secs = r["metrics"], r["last_log"] or {}, r["train_seconds_all_calls"]
        rows.append([name, " ".join(sets) or "-", gpu if gpu is not None else "-", r["steps"], secs, round(secs / max(1, r["steps"]), 3),
                     round(last.get("ce", float("nan")), 3), round(last.get("mse", float("nan")), 4)]
                    + [round(m[k], 3) if k in m else "-" for k in ("t2i", "edit", "vqa")])
    if rows:
        own = len(set(gpus)) == len(gpus) and None not in gpus
        where = ("each on its own GPU, so each made the steps of a run alone" if own else
                 "sharing the device's time, so a run alone makes more steps in the same seconds")
        title, how = (f"ShapesWorld learning runs side by side: {len(procs)} `bagel demo` processes on one machine",
                      f"All runs at once on {device_name()}, each on {len(shares[0])} CPU cores, {where}. ")
        if len(procs) == 1:
            title, how = "ShapesWorld learning run: one `bagel demo` process", f"Alone on {device_name()}, on {len(shares[0])} CPU cores. "
        report(f"{title} ({a.config.name})",
               COLUMNS, rows, notes=how +
                                    "Steps and train s count every call of a resumed run (train s: the logged steps' "
                                    f"seconds); the scores are its latest weights'. Reports: `{a.out}/<run>/report.md`."
                                    + (f" Failed: {', '.join(failed)} (see their log.txt)." if failed else ""),
               results=a.results or RESULTS)
    if failed: raise SystemExit(f"runs failed: {', '.join(failed)}")
    return rows

if __name__ == "__main__":
    main()
