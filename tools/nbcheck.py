#!/usr/bin/env python
"""The notebook discipline checks that `make test` and CI run.

    python tools/nbcheck.py sync    # bagel/ is exactly what nbs/ exports
    python tools/nbcheck.py clean   # every notebook is as nbdev_clean leaves it
    python tools/nbcheck.py readme  # README.md is what index.ipynb renders to
    python tools/nbcheck.py all

Each check works on a scratch copy, so it never overwrites a file in the tree (a hand edit under
bagel/ is reported, not lost). Exit status 1 with one line per problem and the fix.
"""
import filecmp, os, re, shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LIB, NBS = ROOT / "bagel", ROOT / "nbs"

def _scratch(tmp: Path, with_lib: bool) -> Path:
    "Copy what nbdev reads (settings, notebooks, optionally the package's __init__) into `tmp`."
    shutil.copy(ROOT / "settings.ini", tmp)
    shutil.copytree(NBS, tmp / "nbs", symlinks=True, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "_proc"))
    if with_lib:
        (tmp / "bagel").mkdir()
        shutil.copy(LIB / "__init__.py", tmp / "bagel")
    return tmp

def _run(cmd, cwd):
    res = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=cwd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed in the scratch copy:\n{res.stdout}{res.stderr}")

def _source_nb(py: Path) -> str:
    "The notebook named in an exported module's header, for the error message."
    m = re.search(r"File to edit: \.\./(\S+?)\.?\s", py.read_text()) if py.exists() else None
    return m.group(1) if m else "the notebook that exports it"

def check_sync() -> list:
    "Export nbs/ into a scratch package and compare it with bagel/, file by file."
    with tempfile.TemporaryDirectory() as d:
        tmp = _scratch(Path(d), with_lib=True)
        _run(["nbdev_export"], tmp)
        want = {p.relative_to(tmp / "bagel") for p in (tmp / "bagel").rglob("*.py")}
        have = {p.relative_to(LIB) for p in LIB.rglob("*.py") if "__pycache__" not in p.parts}
        errs = []
        for rel in sorted(want | have):
            ours, exported = LIB / rel, tmp / "bagel" / rel
            if rel not in have:
                errs.append(f"bagel/{rel} is missing: run nbdev_export and commit it")
            elif rel not in want:
                errs.append(f"bagel/{rel} is not exported by any notebook: move its code into a notebook under nbs/ "
                            f"(the source of truth) or delete it")
            elif not filecmp.cmp(ours, exported, shallow=False):
                errs.append(f"bagel/{rel} differs from what nbs/ exports: make the change in {_source_nb(exported)} "
                            f"(the source of truth), run nbdev_export, and commit both (never edit bagel/ by hand)")
        return errs

def check_clean() -> list:
    "Run nbdev_clean on a scratch copy of nbs/ and report every notebook it would change."
    with tempfile.TemporaryDirectory() as d:
        tmp = _scratch(Path(d), with_lib=False)
        _run(["nbdev_clean", "--fname", "nbs"], tmp)
        return [f"{nb.relative_to(ROOT)} has stray metadata or execution noise: run nbdev_clean "
                f"(the git hooks from `make` do it on commit) and commit the cleaned notebook"
                for nb in sorted(NBS.rglob("*.ipynb")) if ".ipynb_checkpoints" not in nb.parts
                and not filecmp.cmp(nb, tmp / nb.relative_to(ROOT), shallow=False)]

def check_readme() -> list:
    "README.md must be what tools/build_docs.py renders from nbs/index.ipynb."
    sys.path.insert(0, str(ROOT / "tools"))
    from build_docs import render_readme
    if (ROOT / "README.md").read_text() != render_readme():
        return ["README.md is out of date with nbs/index.ipynb (its source): run `make readme` and commit README.md"]
    return []

def _mixed_import_cells(nb_path: Path) -> list:
    "Indexes of code cells (visible or hidden) holding imports and other statements (nbdev runs import cells alone for docs)."
    import ast, json
    out = []
    for i, c in enumerate(json.loads(nb_path.read_text())["cells"]):
        src = "".join(c["source"]) if c["cell_type"] == "code" else ""
        first = src.lstrip().splitlines()[0] if src.strip() else ""
        if not src.strip() or re.match(r"#\|\s*(export|exporti|exports|eval:\s*false)\b", first): continue
        if "nbdev_export()" in src: continue                    # the closing `import nbdev; nbdev.nbdev_export()` cell
        try: body = ast.parse("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!")))).body
        except SyntaxError: continue
        kinds = {isinstance(n, (ast.Import, ast.ImportFrom)) for n in body}
        if kinds == {True, False}: out.append(i)
    return out

def check_imports() -> list:
    "Imports live in their own cells: the docs build executes every cell that imports, without the cells before it."
    return [f"{nb.relative_to(ROOT)} cell {i} mixes imports with other code: move the imports into the notebook's "
            f"hidden imports cell (the docs build runs import cells on their own, without the cells above)"
            for nb in sorted(NBS.glob("*.ipynb")) for i in _mixed_import_cells(nb)]

CHECKS = {"sync": check_sync, "clean": check_clean, "readme": check_readme, "imports": check_imports}

def main(argv):
    names = list(CHECKS) if argv in ([], ["all"]) else argv
    unknown = [n for n in names if n not in CHECKS]
    if unknown: sys.exit(f"unknown check(s) {unknown}; valid: {sorted(CHECKS)} or all")
    errs = [e for n in names for e in CHECKS[n]()]
    for e in errs: print(f"FAIL: {e}", file=sys.stderr)
    if errs: sys.exit(1)
    print(f"nbcheck: {', '.join(names)} ok")

if __name__ == "__main__":
    main(sys.argv[1:])
