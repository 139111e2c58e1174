#!/usr/bin/env python
"""Write a notebook from a draft in the percent format (`# %%` code cells, `# %% [markdown]` prose).

An authoring aid only: the notebook it writes is the source of truth from then on (edit it in
Jupyter, or regenerate it from a draft you keep outside the repo). Usage:
    python tools/pct2nb.py draft.py nbs/00_core_mot.ipynb
"""
import hashlib, re, sys
from pathlib import Path

import nbformat

def parse(text: str) -> list:
    "Split percent-format text into notebook cells."
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        src = "\n".join(buf).strip("\n")
        if kind == "markdown":
            src = "\n".join(re.sub(r"^# ?", "", l) for l in src.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(src))
        elif src.strip():
            cells.append(nbformat.v4.new_code_cell(src))
    for line in text.splitlines():
        m = re.match(r"^# %%(.*)$", line)
        if m:
            flush()
            kind, buf = ("markdown" if "[markdown]" in m.group(1) else "code"), []
        else:
            buf.append(line)
    flush()
    seen = set()
    for c in cells:  # ids from the content, so regenerating an unchanged cell keeps its id (and the export's diff quiet)
        h = hashlib.sha1(c.source.encode()).hexdigest()
        i = next(h[k:k + 8] for k in range(0, 32) if h[k:k + 8] not in seen)
        seen.add(i); c.id = i
    return cells

def main(src, dst):
    nb = nbformat.v4.new_notebook()
    nb.cells = parse(Path(src).read_text())
    nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    tmp = Path(dst).with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(dst)
    print(f"wrote {dst}: {len(nb.cells)} cells")

if __name__ == "__main__":
    if len(sys.argv) != 3: raise SystemExit(__doc__)
    main(*sys.argv[1:])
