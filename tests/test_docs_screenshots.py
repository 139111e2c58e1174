"""tools/screenshot_lab.py end to end: JupyterLab + headless Chromium render both widget panels into PNGs."""
import shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

def _blank(path: Path) -> bool:
    "True when the image is one flat colour."
    from PIL import Image
    lo, hi = zip(*Image.open(path).convert("RGB").getextrema())
    return lo == hi

@pytest.mark.slow
def test_screenshot_lab(tmp_path):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("needs the system chromium and chromedriver: apt-get install -y chromium chromium-driver")
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "screenshot_lab.py"), "--out", str(tmp_path),
                          "--timeout", "180"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    from PIL import Image
    for name in ("widgets_cfg_sweep.png", "widgets_routing.png"):
        p = tmp_path / name
        assert p.exists(), f"{name} was not written:\n{res.stdout}{res.stderr}"
        assert 0 < p.stat().st_size < 300_000
        im = Image.open(p)
        assert im.format == "PNG" and im.width > 200 and im.height > 200, im.size
        assert not _blank(p)
        colours = len(set(im.convert("RGB").getdata()))
        assert colours > 50, f"{name} has {colours} colours: the figure did not render"   # text alone is a few grey levels
    assert not list(tmp_path.glob("*.tmp"))

def test_save_png_trims_and_refuses_blank(tmp_path):
    "The screenshot writer crops the empty margin and refuses a blank page."
    import io
    from PIL import Image
    sys.path.insert(0, str(ROOT / "tools"))
    try: from screenshot_lab import save_png
    finally: sys.path.remove(str(ROOT / "tools"))
    im = Image.new("RGB", (400, 300), "white")
    im.paste((200, 30, 30), (10, 20, 110, 120))
    buf = io.BytesIO(); im.save(buf, format="PNG")
    out = save_png(buf.getvalue(), tmp_path / "shot.png")
    assert Image.open(out).size == (110 + 16, 120 + 8)
    blank = io.BytesIO(); Image.new("RGB", (50, 50), "white").save(blank, format="PNG")
    with pytest.raises(RuntimeError, match="blank"): save_png(blank.getvalue(), tmp_path / "blank.png")
