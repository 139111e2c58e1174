#!/usr/bin/env python
"""Build the docs site and README.md from the notebooks.

    python tools/build_docs.py site     # _docs/: Quarto via nbdev_docs if installed, else the offline fallback
    python tools/build_docs.py readme   # README.md from nbs/index.ipynb

The offline fallback (Quarto cannot be installed on machines without internet) processes the
notebooks with nbdev's own processors (`nbdev.serve.proc_nbs`: hidden cells dropped, `show_doc`
rendered, directives applied) into `_proc/`, then renders each processed notebook, with its saved
outputs, to HTML with nbconvert, and adds the sidebar of `_quarto.yml` to every page.
"""
import html, json, os, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS, DOCS = ROOT / "nbs", ROOT / "_docs"
HIDE = re.compile(r"^\s*#\|\s*(hide|exporti|include:\s*false)\b", re.M)
DIRECTIVE = re.compile(r"^\s*#\|.*\n?", re.M)

def _cells(nb_path: Path):
    return json.loads(nb_path.read_text())["cells"]

def _src(cell) -> str:
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s

def render_readme() -> str:
    "README.md text from nbs/index.ipynb: prose as is, visible code cells fenced, their text outputs below."
    out = ["<!-- Generated from nbs/index.ipynb by `make readme`; edit the notebook, not this file. -->\n"]
    for cell in _cells(NBS / "index.ipynb"):
        src = _src(cell)
        if cell["cell_type"] == "markdown":
            out.append(src.strip() + "\n")
        elif cell["cell_type"] == "code" and not HIDE.search(src):
            code = DIRECTIVE.sub("", src).strip()
            if code: out.append(f"```python\n{code}\n```\n")
            texts = ["".join(o.get("text", "")) if o["output_type"] == "stream"
                     else "".join(o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", [])]
            texts = [t.rstrip() for t in texts if t.strip()]
            if texts: out.append("```\n" + "\n".join(texts) + "\n```\n")
    return "\n".join(out)

def sidebar() -> list:
    "(section, [notebook file names]) pairs from the sidebar of _quarto.yml, in order."
    import yaml
    contents = yaml.safe_load((ROOT / "_quarto.yml").read_text())["website"]["sidebar"]["contents"]
    groups = []
    for item in contents:
        if isinstance(item, str): groups.append(("", [item]))
        else: groups.append((item["section"], list(item["contents"])))
    return groups

def check_sidebar() -> list:
    "Every notebook is in the sidebar and every sidebar entry exists."
    listed = [f for _, fs in sidebar() for f in fs]
    present = sorted(p.name for p in NBS.glob("*.ipynb"))
    errs = [f"_quarto.yml sidebar lists {f}, which is not in nbs/" for f in listed if f not in present]
    errs += [f"nbs/{f} is missing from the sidebar in _quarto.yml: add it to its section" for f in present if f not in listed]
    return errs

def _title(nb: Path) -> str:
    for cell in _cells(nb):
        m = re.search(r"^#\s+(.+)$", _src(cell), re.M) if cell["cell_type"] == "markdown" else None
        if m: return m.group(1).strip()
    return nb.stem

def _nav(current: str) -> str:
    parts = ['<nav class="bagel-sidebar"><p class="bagel-site">bagel docs</p><p class="bagel-fallback">'
             'Offline build (nbconvert); the Quarto build of the same notebooks is used where Quarto is installed.</p>']
    for section, files in sidebar():
        if section: parts.append(f"<h4>{html.escape(section)}</h4>")
        parts.append("<ul>")
        for f in files:
            page, cls = Path(f).with_suffix(".html").name, ' class="current"' if f == current else ""
            parts.append(f'<li><a href="{page}"{cls}>{html.escape(_title(NBS / f))}</a></li>')
        parts.append("</ul>")
    return "\n".join(parts + ["</nav>"])

STYLE = """<style>
body { margin: 0; } .bagel-sidebar { position: fixed; top: 0; left: 0; width: 15rem; height: 100%; overflow-y: auto;
  padding: 1rem; background: #f6f6f8; border-right: 1px solid #ddd; font: 14px/1.4 sans-serif; }
.bagel-sidebar ul { list-style: none; padding-left: .5rem; } .bagel-sidebar a.current { font-weight: bold; }
.bagel-site { font-size: 1.2rem; font-weight: bold; } .bagel-fallback { font-size: .75rem; color: #777; }
.bagel-page { margin-left: 17rem; padding: 1rem 2rem; max-width: 60rem; }
</style>"""

def _frontmatter_to_title(nb_path: Path):
    "Quarto reads the title from the YAML front matter nbdev writes; nbconvert needs it as a heading."
    import nbformat, yaml
    nb = nbformat.read(nb_path, as_version=4)
    first = nb.cells[0] if nb.cells else None
    if first is not None and first.cell_type == "raw" and first.source.startswith("---"):
        meta = yaml.safe_load(first.source.strip().strip("-")) or {}
        head = f"# {meta.get('title', nb_path.stem)}" + (f"\n\n> {meta['description']}" if meta.get("description") else "")
        nb.cells[0] = nbformat.v4.new_markdown_cell(head)
    for cell in nb.cells:                    # what Quarto does with nbdev's cell options, done by hand for nbconvert
        if cell.cell_type != "code": continue
        lines = cell.source.splitlines()
        if any(re.match(r"#\|\s*echo:\s*false", l) for l in lines):
            cell.metadata.setdefault("tags", []).append("remove_input")
        cell.source = "\n".join(l for l in lines if not l.startswith("#|")).strip()
        for out in cell.get("outputs", []):
            md = out.get("data", {}).get("text/markdown")
            if md: out["data"]["text/markdown"] = re.sub(r"\{target=\"_blank\"[^}]*\}", "", "".join(md))
    return nb

def _fallback_site():
    "Process the notebooks with nbdev's processors, then render them with nbconvert (saved outputs)."
    from nbdev.config import get_config
    from nbdev.doclinks import _build_modidx
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.serve import proc_nbs
    import warnings
    warnings.filterwarnings("ignore", message=".*missing an id field.*")
    os.chdir(ROOT)
    refresh_quarto_yml()
    _build_modidx()
    proc = proc_nbs(str(NBS), n_workers=0)
    from nbconvert import HTMLExporter
    exporter = HTMLExporter(template_name="lab")
    exporter.exclude_input_prompt = exporter.exclude_output_prompt = True
    from nbconvert.preprocessors import TagRemovePreprocessor
    exporter.register_preprocessor(TagRemovePreprocessor(remove_input_tags={"remove_input"}), enabled=True)
    if DOCS.exists(): shutil.rmtree(DOCS)
    DOCS.mkdir()
    pages = sorted(p for p in proc.glob("*.ipynb"))
    for nb in pages:
        body, _ = exporter.from_notebook_node(_frontmatter_to_title(nb))
        body = body.replace("<body", STYLE + "<body", 1)
        body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + _nav(nb.name) + '<div class="bagel-page">', body, count=1)
        body = body.replace("</body>", "</div></body>", 1)
        body = re.sub(r'href="([^":#/]+)\.ipynb', r'href="\1.html', body)   # links between notebooks
        tmp = DOCS / (nb.stem + ".html.tmp")
        tmp.write_text(body)
        tmp.replace(DOCS / (nb.stem + ".html"))
    for extra in ["styles.css"]:
        if (NBS / extra).exists(): shutil.copy(NBS / extra, DOCS)
    if (NBS / "images").is_dir(): shutil.copytree(NBS / "images", DOCS / "images")   # pictures the pages link to
    print(f"docs (offline fallback, nbconvert): {len(pages)} pages in {DOCS.relative_to(ROOT)}/ "
          f"-- install Quarto for the full site (nbdev_docs)")

def build_site():
    errs = check_sidebar()
    if errs: sys.exit("\n".join(f"FAIL: {e}" for e in errs))
    if shutil.which("quarto"):
        subprocess.run([str(Path(sys.executable).parent / "nbdev_docs")], cwd=ROOT, check=True)
        print(f"docs (Quarto): {DOCS.relative_to(ROOT)}/")
    else:
        print("Quarto is not on PATH: building the offline fallback site instead")
        _fallback_site()

def write_readme():
    text = render_readme()
    tmp = ROOT / "README.md.tmp"
    tmp.write_text(text)
    tmp.replace(ROOT / "README.md")
    print("README.md written from nbs/index.ipynb")

if __name__ == "__main__":
    cmds = {"site": build_site, "readme": write_readme}
    if len(sys.argv) != 2 or sys.argv[1] not in cmds: sys.exit(__doc__)
    cmds[sys.argv[1]]()
