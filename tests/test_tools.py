"""The notebook discipline checks of `make test` (tools/nbcheck.py) and the docs sidebar check, on a scratch copy."""
import json, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture
def repo(tmp_path):
    "A copy of what the checks read: settings, notebooks, package, tools, README, docs config."
    for d in ["nbs", "bagel", "tools"]:
        shutil.copytree(ROOT / d, tmp_path / d, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    for f in ["settings.ini", "README.md", "_quarto.yml"]:
        shutil.copy(ROOT / f, tmp_path / f)
    return tmp_path

def nbcheck(repo, *checks):
    return subprocess.run([sys.executable, str(repo / "tools" / "nbcheck.py"), *checks], capture_output=True, text=True)

def test_clean_tree_passes(repo):
    res = nbcheck(repo, "sync", "clean", "readme")
    assert res.returncode == 0, res.stderr

def test_hand_edit_under_bagel_fails_and_names_the_notebook(repo):
    with open(repo / "bagel" / "model.py", "a") as f: f.write("\nHAND_EDIT = 1\n")
    res = nbcheck(repo, "sync")
    assert res.returncode == 1
    assert "bagel/model.py differs from what nbs/ exports" in res.stderr and "nbs/02_model.ipynb" in res.stderr
    assert "HAND_EDIT" in (repo / "bagel" / "model.py").read_text()  # reported, not overwritten

def test_unexported_module_fails(repo):
    (repo / "bagel" / "stray.py").write_text("x = 1\n")
    res = nbcheck(repo, "sync")
    assert res.returncode == 1 and "bagel/stray.py is not exported by any notebook" in res.stderr

def test_stray_metadata_fails_until_cleaned(repo):
    nb_path = repo / "nbs" / "04_testing.ipynb"
    nb = json.loads(nb_path.read_text())
    nb["cells"][0]["metadata"]["collapsed"] = True
    nb["cells"][0]["execution_count"] = 7
    nb_path.write_text(json.dumps(nb, indent=1))
    res = nbcheck(repo, "clean")
    assert res.returncode == 1 and "nbs/04_testing.ipynb has stray metadata" in res.stderr
    subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", str(nb_path)], cwd=repo, check=True)
    assert nbcheck(repo, "clean").returncode == 0

def test_stale_readme_fails(repo):
    with open(repo / "README.md", "a") as f: f.write("\nedited by hand\n")
    res = nbcheck(repo, "readme")
    assert res.returncode == 1 and "README.md is out of date" in res.stderr

def test_sidebar_must_list_every_notebook(repo):
    sys.path.insert(0, str(repo / "tools"))
    try:
        import importlib, build_docs
        importlib.reload(build_docs)
        assert build_docs.check_sidebar() == []
        shutil.copy(repo / "nbs" / "04_testing.ipynb", repo / "nbs" / "05_new.ipynb")
        assert build_docs.check_sidebar() == ["nbs/05_new.ipynb is missing from the sidebar in _quarto.yml: add it to its section"]
    finally:
        sys.path.remove(str(repo / "tools"))

def test_cells_mixing_imports_with_code_fail(repo):
    "Visible and hidden cells alike (nbdev's docs processor runs import cells alone); the nbdev_export cell is exempt."
    assert nbcheck(repo, "imports").returncode == 0
    nb_path = repo / "nbs" / "05_transforms.ipynb"
    nb = json.loads(nb_path.read_text())
    nb["cells"].insert(3, {"cell_type": "code", "execution_count": None, "id": "mixed001", "metadata": {}, "outputs": [],
                           "source": ["#| hide\n", "import math\n", "x = math.pi\n"]})
    nb_path.write_text(json.dumps(nb, indent=1))
    res = nbcheck(repo, "imports")
    assert res.returncode == 1 and "nbs/05_transforms.ipynb cell 3 mixes imports with other code" in res.stderr
