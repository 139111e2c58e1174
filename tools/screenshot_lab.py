#!/usr/bin/env python
"""Screenshots of the two ipywidgets panels of `bagel.widgets`, rendered in JupyterLab in headless Chromium.

    .venv/bin/python tools/screenshot_lab.py                 # writes nbs/images/widgets_{cfg_sweep,routing}.png
    .venv/bin/python tools/screenshot_lab.py --out /tmp/shots --timeout 240

What it does, in order: writes a small notebook into a temporary folder (a tiny random checkpoint, then
`cfg_sweep_panel` and `routing_panel` on it); starts JupyterLab from this Python's environment on 127.0.0.1
(a free port, a random token, `--allow-root` when run as root, its config, settings, workspaces and runtime
files in the same temporary folder, so nothing of the user's is read or written); opens the notebook in
headless Chromium through Selenium; runs every cell through JupyterLab's own "Run All Cells"; clicks the
sweep panel's Run button; waits until both panels show their figures; saves a screenshot of each cell's output
area (PNG, under 300 KB); then closes the browser, shuts the server down and deletes the folder.

Needs `selenium` in the environment and the system `chromium` and `chromedriver`
(Debian: `apt-get install -y chromium chromium-driver`). Exit status 1 with the reason when a step fails.
"""
import argparse, io, json, os, secrets, shutil, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MAX_BYTES = 300_000
SHOTS = {"cfg_sweep": "widgets_cfg_sweep.png", "routing": "widgets_routing.png"}  # panel -> file name
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--window-size=1400,1000"]

CELLS = [  # the notebook the browser runs: one panel per cell, so each has its own output area
    "%matplotlib inline\n"  # the panels display matplotlib Figures: the inline backend gives them a PNG form
    "import tempfile, torch\n"
    "from bagel.inferencer import Inferencer\n"
    "from bagel.testing import write_tiny_checkpoint\n"
    "from bagel.widgets import cfg_sweep_panel, routing_panel",
    "inf = Inferencer.from_pretrained(write_tiny_checkpoint(tempfile.mkdtemp() + '/tiny'), dtype=torch.float32)",
    "sweep = cfg_sweep_panel(inf, 'a red circle left of a blue square', image_shape=(64, 64))\n"
    "sweep.controls['cols'].value = 'timestep_shift'   # rows: cfg_text_scale 1, 4, 8; cols: timestep_shift 1, 3, 5\n"
    "sweep.controls['num_timesteps'].value = 6\n"
    "sweep",
    "routing = routing_panel(inf, 'a red circle left of a blue square', (64, 64))\n"
    "routing.controls['layer'].value = 1   # draws layer 1, head 0 at the first denoising step\n"
    "routing",
]

def write_notebook(path: Path):
    "The panels notebook, as nbformat 4 JSON."
    cell = lambda src: {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": src}
    nb = {"cells": [cell(s) for s in CELLS], "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}
    path.write_text(json.dumps(nb, indent=1))

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def _jupyter_dirs(tmp: Path) -> dict:
    "Private config, settings, workspace and runtime folders for the server (nothing of the user's is touched)."
    d = {k: tmp / k for k in ("config", "settings", "workspaces", "runtime")}
    for p in d.values(): p.mkdir(parents=True, exist_ok=True)
    (d["config"] / "labconfig").mkdir()
    (d["config"] / "labconfig" / "page_config.json").write_text(json.dumps(   # no "news?" toast over the page
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    nb_settings = d["settings"] / "@jupyterlab" / "notebook-extension"
    nb_settings.mkdir(parents=True)                                            # render every cell, not only visible ones
    (nb_settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    return {"JUPYTER_CONFIG_DIR": str(d["config"]), "JUPYTERLAB_SETTINGS_DIR": str(d["settings"]),
            "JUPYTERLAB_WORKSPACES_DIR": str(d["workspaces"]), "JUPYTER_RUNTIME_DIR": str(d["runtime"])}

def start_lab(tmp: Path, port: int, token: str, log) -> subprocess.Popen:
    "JupyterLab from this environment on 127.0.0.1:port, serving `tmp/nb`; returns once it answers."
    cmd = [str(BIN / "jupyter"), "lab", "--ip=127.0.0.1", f"--port={port}", "--no-browser",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={tmp / 'nb'}", "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0: cmd.append("--allow-root")
    env = os.environ | _jupyter_dirs(tmp) | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp / "nb")
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    for _ in range(120):
        if proc.poll() is not None: raise RuntimeError(f"JupyterLab exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2): return proc
        except OSError: time.sleep(0.5)
    raise RuntimeError("JupyterLab did not answer within 60 s")

def stop_lab(proc: subprocess.Popen, port: int, token: str):
    "Ask the server to shut down (it stops its kernels); terminate it if it does not."
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/shutdown?token={token}", method="POST")
        urllib.request.urlopen(req, timeout=5)
    except OSError: pass
    try: proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try: proc.wait(timeout=10)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()

def browser():
    "Headless Chromium driven by the system chromedriver."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chrome = next((p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p), None)
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        raise RuntimeError(f"needs Chromium and chromedriver (found {chrome}, {driver}): apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for f in CHROME_FLAGS: opts.add_argument(f)
    return webdriver.Chrome(service=Service(driver), options=opts)

def _wait(drv, what: str, cond, timeout: float):
    from selenium.webdriver.support.ui import WebDriverWait
    try: return WebDriverWait(drv, timeout, poll_frequency=0.5).until(lambda d: cond(d))
    except Exception as e:
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}") from e

KERNEL_IDLE = """const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
return !!(k && k.status === 'idle' && w.content && w.content.widgets.length > 0);"""

def _run_all(drv):
    "JupyterLab's Run > Run All Cells (through the app's command registry, as the menu does)."
    drv.execute_script("return window.jupyterapp.commands.execute('notebook:run-all-cells');")

def _output(drv, i: int):
    "The output area of code cell i."
    from selenium.webdriver.common.by import By
    return drv.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell")[i].find_element(By.CSS_SELECTOR, ".jp-OutputArea")

def _errors(drv) -> str:
    from selenium.webdriver.common.by import By
    return "\n".join(e.text for e in drv.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type*='error']"))

def _img_ready(drv, i: int) -> bool:
    "Cell i shows at least one decoded image inside a widget."
    from selenium.webdriver.common.by import By
    if _errors(drv): raise RuntimeError(f"a cell failed in the browser:\n{_errors(drv)}")
    imgs = _output(drv, i).find_elements(By.CSS_SELECTOR, ".jupyter-widgets img")
    return bool(imgs) and all(drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0;", im)
                              for im in imgs)

def save_png(png: bytes, path: Path) -> Path:
    "Write a screenshot without its empty margin, quantised to a palette if it is larger than MAX_BYTES."
    from PIL import Image, ImageChops
    im = Image.open(io.BytesIO(png)).convert("RGB")
    diff = ImageChops.difference(im, Image.new("RGB", im.size, im.getpixel((im.width - 1, im.height - 1)))).convert("L")
    box = diff.point(lambda v: 255 if v > 48 else 0).getbbox()   # faint rules (the cell's border) do not count
    if box is None: raise RuntimeError(f"the screenshot for {path.name} is blank")
    im = im.crop((0, 0, min(im.width, box[2] + 16), min(im.height, box[3] + 8)))  # drop the empty right and bottom
    buf = io.BytesIO(); im.save(buf, format="PNG", optimize=True)
    if buf.tell() > MAX_BYTES:
        buf = io.BytesIO(); im.quantize(colors=256).save(buf, format="PNG", optimize=True)
    if buf.tell() > MAX_BYTES: raise RuntimeError(f"{path.name} is {buf.tell()} bytes even as a palette PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp"); tmp.write_bytes(buf.getvalue()); tmp.replace(path)
    return path

def take(out: Path, timeout: float = 300) -> list:
    "Start JupyterLab and Chromium, run the panels notebook, save both screenshots; returns their paths."
    from selenium.webdriver.common.by import By
    tmp = Path(tempfile.mkdtemp(prefix="bagel-lab-"))
    (tmp / "nb").mkdir()
    write_notebook(tmp / "nb" / "panels.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    log = open(tmp / "lab.log", "w")
    proc = drv = None
    try:
        proc = start_lab(tmp, port, token, log)
        drv = browser()
        drv.get(f"http://127.0.0.1:{port}/lab/tree/panels.ipynb?reset&token={token}")
        _wait(drv, "the notebook and an idle kernel", lambda d: d.execute_script(KERNEL_IDLE), timeout)
        _run_all(drv)
        run = _wait(drv, "the sweep panel's Run button", lambda d: next(iter(
            _output(d, 2).find_elements(By.XPATH, ".//button[normalize-space()='Run']")), None), timeout)
        run.click()
        _wait(drv, "the sweep grid", lambda d: _img_ready(d, 2), timeout)
        _wait(drv, "the routing figure", lambda d: _img_ready(d, 3), timeout)
        _wait(drv, "the kernel to finish", lambda d: d.execute_script(KERNEL_IDLE), timeout)
        time.sleep(1)                                               # let the last layout settle
        paths = []
        for i, (name, fname) in zip((2, 3), SHOTS.items()):
            el = _output(drv, i)
            drv.execute_script("arguments[0].scrollIntoView({block: 'start'});", el)
            time.sleep(0.3)
            paths.append(save_png(el.screenshot_as_png, out / fname))
        return paths
    except Exception:
        log.flush()
        print(f"JupyterLab log ({tmp / 'lab.log'}), last lines:\n" + "".join((tmp / "lab.log").read_text().splitlines(True)[-20:]),
              file=sys.stderr)
        raise
    finally:
        if drv is not None: drv.quit()
        if proc is not None: stop_lab(proc, port, token)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "nbs" / "images", help="folder for the PNGs")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for each step in the browser")
    a = ap.parse_args(argv)
    try: paths = take(a.out, a.timeout)
    except Exception as e:
        print(f"screenshot_lab: {type(e).__name__}: {e}", file=sys.stderr); return 1
    for p in paths:
        from PIL import Image
        print(f"wrote {p} ({p.stat().st_size // 1024} KB, {Image.open(p).size[0]}x{Image.open(p).size[1]} px)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
