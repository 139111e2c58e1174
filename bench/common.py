"""Shared helpers of the benchmarks: the device's name, timing, the one-table report, and command-line values."""
import argparse, datetime, os, platform, subprocess, time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")

def device_name() -> str:
    "The accelerator (model x count) or, without one, the CPU model and core count."
    import torch
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{torch.cuda.get_device_name(0)} x{n}" if n > 1 else torch.cuda.get_device_name(0)
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip(); break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, no GPU)"

def sync():
    "Wait for queued GPU work (no-op on CPU)."
    import torch
    if torch.cuda.is_available(): torch.cuda.synchronize()

def timed_peak(fn) -> tuple:  # -> (seconds, peak GiB, result)
    "One warm-up call, then one timed call with the device synchronised; peak GPU memory of the timed call (0 on CPU)."
    import torch
    cuda = torch.cuda.is_available()
    fn(); sync()
    if cuda: torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter(); out = fn(); sync()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, out

def op_tables(fn, sorts: tuple = ("self_cuda_time_total",), rows: int = 25, trace: Path | None = None) -> str:
    "Run `fn` (then sync) under torch.profiler (CPU, and CUDA when present); its op table sorted by each of `sorts`."
    import gzip, shutil, tempfile
    import torch
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as p:
        fn(); sync()
    if trace is not None:                             # the Chrome trace, gzipped, written atomically
        with tempfile.TemporaryDirectory() as d:
            raw = Path(d) / "trace.json"; p.export_chrome_trace(str(raw))
            part = trace.with_name(trace.name + ".part")
            with open(raw, "rb") as a, gzip.open(part, "wb") as b: shutil.copyfileobj(a, b)
            part.replace(trace)
    ka = p.key_averages()
    return "\n".join(ka.table(sort_by=s if cuda or "cuda" not in s else "self_cpu_time_total", row_limit=rows,
                               max_name_column_width=70) for s in sorts)

def times(fn, warmup: int = 2, iters: int = 5) -> list:
    "Seconds of each of `iters` calls of `fn()` after `warmup` calls, device synchronised around each call; sorted."
    for _ in range(warmup): fn()
    out = []
    for _ in range(iters):
        sync(); t0 = time.perf_counter(); fn(); sync()
        out.append(time.perf_counter() - t0)
    return sorted(out)

def timeit(fn, warmup: int = 2, iters: int = 5) -> float:
    "Median seconds of `fn()` after `warmup` calls, device synchronised around each call."
    t = times(fn, warmup, iters)
    return t[len(t) // 2]

def interval(text: str) -> tuple:
    "A CFG interval from the command line: 'START,END' with 0 <= START < END <= 1 -> (START, END)."
    try: a, b = (float(v) for v in text.split(","))
    except ValueError: raise argparse.ArgumentTypeError(f"{text!r}: give a CFG interval as START,END, e.g. 0.4,1") from None
    if not 0 <= a < b <= 1: raise argparse.ArgumentTypeError(f"{text!r}: a CFG interval needs 0 <= START < END <= 1")
    return (a, b)

def guided_settings(scales: list, spans: list) -> list:
    "(scale, interval) pairs to sample: every interval for a guided scale (> 1), one (the first) for an unguided one."
    return [(s, p) for s in scales for p in (spans if s > 1 else spans[:1])]

def _git_commit() -> str:
    if os.environ.get("BAGEL_COMMIT"): return os.environ["BAGEL_COMMIT"]  # set when the tree travels without .git
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

def table(columns: list, rows: list) -> str:
    "A markdown table."
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)

def report(title: str, columns: list, rows: list, notes: str = "", results: Path = RESULTS) -> str:
    "Print the benchmark's one table and append it, with date, commit and device, to RESULTS.md."
    head = (f"## {title}\n\n{datetime.date.today().isoformat()} · commit {_git_commit()} · "
            f"device: **{device_name()}**\n\n")
    text = head + table(columns, rows) + (f"\n\n{notes}" if notes else "") + "\n\n"
    print(text)
    old = results.read_text() if results.exists() else "# Benchmark results\n\nAppended by `bench/*.py`; newest last.\n\n"
    tmp = results.with_suffix(".md.tmp")
    tmp.write_text(old + text)
    tmp.replace(results)
    return text

def sync_sites(fn) -> str:
    "Run `fn` under CUDA's sync debug mode; the count of synchronising calls and where they come from."
    import collections, warnings
    import torch
    torch.cuda.synchronize(); torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always"); fn()
    finally: torch.cuda.set_sync_debug_mode(0)
    sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in ws if "synchroniz" in str(w.message))
    return f"{sum(sites.values())} ({', '.join(f'{k} x{v}' for k, v in sites.most_common(8)) or 'none'})"
