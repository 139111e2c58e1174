"""Figures of ShapesWorld learning runs from their saved results (`bench/results/<run>/`, as `bagel demo` writes them).

`--run LABEL=DIR` (repeat): the flow-matching and CE curves against training seconds, which compares runs whose steps
differ in length (16k, 32k or 64k-token packs), and each run's ShapesWorld-Bench scores beside the goals.
`--samples DIR`: a strip of that run's held-out samples (T2I prompts, the edit's source and result, the question),
each titled with its prompt and the judge's verdict.

nb 36's two figures:

    python -m bench.plot_runs --out nbs/images/shapesworld_gpu_curves.png \\
        --run "32nd: patch 2, 4300 steps=bench/results/shapesworld_gpu_h200_2026-11-30e" \\
        --run "36th: patch 4 + raster, ViT 126 px=bench/results/shapesworld_gpu_h200_2026-11-30i" \\
        --run "43rd: ViT 84 px, weights [3, 1, 1.4]=bench/results/shapesworld_gpu_h200_2026-11-30p" \\
        --run "46th: ViT 42 px, weights [5, 1, 1.4]=bench/results/shapesworld_gpu_h200_2026-11-30r" \\
        --run "48th: 46th + VAE v2 (the config)=bench/results/shapesworld_gpu_h200_2026-11-30t"
    python -m bench.plot_runs --out nbs/images/shapesworld_gpu_samples.png --samples bench/results/shapesworld_gpu_h200_2026-11-30t
"""
import argparse, json, textwrap
from pathlib import Path

GOALS = {"t2i": 0.9, "edit": 0.8, "vqa": 0.9}   # the training issue's

def _files(path: Path) -> tuple:  # -> (report.json, run/metrics.jsonl) of a saved run
    rep, log = path / "report.json", path / "run" / "metrics.jsonl"
    if not rep.exists() or not log.exists():
        raise SystemExit(f"{path} is not a saved learning run: it needs report.json and run/metrics.jsonl")
    return rep, log

def read_run(path: Path) -> dict:
    "A run's log rows (run/metrics.jsonl, with `seconds`: training seconds at each log) and its report.json."
    from itertools import accumulate
    from bagel.train import read_metrics, window_seconds
    rep, log = _files(path)
    recs = read_metrics(log.parent)
    rows = [r | {"seconds": t} for r, t in zip(recs, accumulate(map(window_seconds, recs)))]
    return {"rows": rows, "report": json.loads(rep.read_text())}

def _label_dir(spec: str) -> tuple:
    label, eq, d = spec.rpartition("=")
    if not eq or not label: raise SystemExit(f"--run {spec!r}: use LABEL=DIR")
    return label, Path(d)

def plot_curves(runs: dict, out: Path) -> Path:  # runs: {label: read_run(...)}
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for label, r in runs.items():
        for ax, key in zip(axes[:2], ("mse", "ce")):
            pts = [(x["seconds"], x[key]) for x in r["rows"] if key in x]
            ax.plot(*zip(*pts), label=label, lw=1.2)
    for ax, title in zip(axes[:2], ("flow-matching MSE", "CE (answer tokens)")):
        ax.set(title=title, xlabel="training seconds", yscale="log")
    axes[0].legend(fontsize=7)
    ax, tasks, w = axes[2], list(GOALS), 0.8 / max(1, len(runs))
    for i, (label, r) in enumerate(runs.items()):
        m = r["report"]["metrics"]
        ax.bar([k + i * w for k in range(len(tasks))], [m.get(t, 0.0) for t in tasks], w)   # colours as the curves
    for k, t in enumerate(tasks):
        ax.hlines(GOALS[t], k - 0.05, k + 0.85, colors="k", linestyles="dashed", lw=1)
    ax.set(title="ShapesWorld-Bench (dashed: goals)", ylim=(0, 1), xticks=[k + 0.4 - w / 2 for k in range(len(tasks))],
           xticklabels=tasks)
    fig.tight_layout(); out.parent.mkdir(parents=True, exist_ok=True); fig.savefig(out, dpi=110); plt.close(fig)
    return out

def plot_samples(path: Path, out: Path) -> Path:
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    rows = json.loads(_files(path)[0].read_text())["samples"]   # [task, text, image file, judged ok, why not]
    panels = []
    for task, text, name, ok, why in rows:
        if task == "edit": panels.append(("edit source", path / "edit_source.png"))
        mark = "✓" if ok else f"✗ ({why})" if why else "✗"
        panels.append((f"{task}: {text} {mark}", path / name))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 2.9))
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(Image.open(img).convert("RGB"), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(title, 24)), fontsize=7.5); ax.set_xticks([]); ax.set_yticks([])
    fig.tight_layout(); out.parent.mkdir(parents=True, exist_ok=True); fig.savefig(out, dpi=110); plt.close(fig)
    return out

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], metavar="LABEL=DIR", help="a saved run to plot (repeat)")
    ap.add_argument("--samples", type=Path, default=None, help="a saved run whose samples to lay out")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    a = ap.parse_args(argv)
    if bool(a.run) == bool(a.samples): raise SystemExit("give --run LABEL=DIR (one or more) or --samples DIR, not both")
    if a.samples: return plot_samples(a.samples, a.out)
    return plot_curves({label: read_run(d) for label, d in map(_label_dir, a.run)}, a.out)

if __name__ == "__main__":
    main()
