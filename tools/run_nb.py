#!/usr/bin/env python
"""Execute notebooks in place so their saved outputs (the figures the docs show) are fresh.

    python tools/run_nb.py nbs/02_model.ipynb [more.ipynb ...] [--flags gpu]

Cells flagged with a `tst_flags` flag (`#| gpu`, `#| multigpu`, `#| slow`) are skipped unless the flag is
given, and keep the outputs they already had (e.g. figures made on a GPU machine). Written atomically;
run `nbdev_clean` afterwards (the git hook does).
"""
import argparse, configparser, os, re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent

def _flags() -> set:
    cfg = configparser.ConfigParser(); cfg.read(ROOT / "settings.ini")
    return set(cfg["DEFAULT"].get("tst_flags", "").split())

class _SkipFlagged(NotebookClient):
    "Run every code cell except those carrying a flag that was not asked for."
    def __init__(self, nb, skip: set, **kw):
        super().__init__(nb, **kw)
        self.skip = skip

    async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
        first = cell.source.lstrip().splitlines()[0] if cell.cell_type == "code" and cell.source.strip() else ""
        m = re.match(r"#\|\s*(\w+)\s*$", first)
        if m and m.group(1) in self.skip: return cell
        return await super().async_execute_cell(cell, cell_index, execution_count, store_history)

def run(path: Path, flags: set, timeout: int = 600):
    nb = nbformat.read(path, as_version=4)
    _SkipFlagged(nb, skip=_flags() - flags, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)
    print(f"executed {path}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--flags", nargs="*", default=[], help="flagged cells to run too (e.g. gpu)")
    a = ap.parse_args()
    for p in a.notebooks: run(p, set(a.flags))
