"""bagel.app: the Gradio app served on loopback with a tiny random checkpoint, driven through its HTTP API
(gradio_client) and in headless Chromium (Selenium, the system chromium + chromedriver)."""
import os, shutil, socket, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch
from PIL import Image

from bagel.app import (EDIT_CONTROLS, T2I_CONTROLS, UND_CONTROLS, AppBackend, build_app, load_inferencer,
                       resolve_model_dir)
from bagel.checkpoint import from_pretrained
from bagel.inferencer import Inferencer
from bagel.transforms import ImageTransform

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install gradio==6.31.0)")
from gradio_client import Client, handle_file

DOCS_IMAGE = Path(__file__).resolve().parent.parent / "nbs" / "images" / "app_t2i.png"
FAST = {"num_timesteps": 10}   # the slider's minimum: 9 model calls per image

def args(controls, **over) -> list:
    "The positional API inputs of a tab's controls: defaults, with `over` replacing some."
    return [over.get(c.key, c.default) for c in controls]

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

@pytest.fixture(scope="session")
def served(tmp_path_factory):
    "The app on a free loopback port: (url, folder for files)."
    tmp = tmp_path_factory.mktemp("app")
    model_dir, what = resolve_model_dir(candidates=(), cache=tmp / "cache")   # writes the tiny random checkpoint
    assert "tiny random" in what and (model_dir / "ema.safetensors").is_file()
    inf = Inferencer(from_pretrained(model_dir, dtype=torch.float32),
                     vae_transform=ImageTransform(64, 32, 16))               # 64 px edits keep the test fast
    demo = build_app(inf, image_size=64, preview_every=3, concurrency_limit=2, max_size=32)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, inline=False, quiet=True,
                ssr_mode=False)
    photo = Image.new("RGB", (64, 64), (240, 240, 240)); photo.paste((220, 30, 30), (16, 16, 48, 48))
    photo.save(tmp / "photo.png")
    yield f"http://127.0.0.1:{port}/", tmp
    demo.close()

@pytest.fixture(scope="session")
def client(served):
    url, tmp = served
    return Client(url, verbose=False, download_files=str(tmp / "downloads"), analytics_enabled=False)

def test_each_tab_over_the_api(client, served):
    _, tmp = served
    job = client.submit("a red circle", *args(T2I_CONTROLS, seed=5, **FAST), api_name="/text_to_image")
    image, thought = job.result(timeout=60)
    assert Image.open(image).size == (64, 64) and thought == ""
    assert len(job.outputs()) > 1                       # previews were streamed before the final image
    again, _ = client.predict("a red circle", *args(T2I_CONTROLS, seed=5, **FAST), api_name="/text_to_image")
    assert Image.open(again).tobytes() == Image.open(image).tobytes()   # a seed repeats the image
    wide, _ = client.predict("a red circle", *args(T2I_CONTROLS, ratio="16:9", **FAST), api_name="/text_to_image")
    assert Image.open(wide).size == (64, 32)            # (W, H) of 16:9 capped at 64 px
    edited, _ = client.predict(handle_file(str(tmp / "photo.png")), "make the square green", *args(EDIT_CONTROLS, **FAST),
                               api_name="/edit_image")
    assert Image.open(edited).size == (64, 64)
    answer = client.predict(handle_file(str(tmp / "photo.png")), "what colour is the square?",
                            *args(UND_CONTROLS, max_tokens=64), api_name="/understand_image")
    assert isinstance(answer, str)

def test_think_mode_returns_the_thinking_text(client):
    image, thought = client.predict("a red circle", *args(T2I_CONTROLS, think=True, max_tokens=64, **FAST),
                                    api_name="/text_to_image")
    assert isinstance(thought, str) and len(thought) > 0 and Image.open(image).size == (64, 64)

def test_eight_concurrent_requests(client, served):
    _, tmp = served
    def one(i):
        if i % 4 == 3:
            return client.predict(handle_file(str(tmp / "photo.png")), f"question {i}?", *args(UND_CONTROLS, max_tokens=64),
                                  api_name="/understand_image")
        return client.predict(f"prompt number {i}", *args(T2I_CONTROLS, seed=i + 1, **FAST), api_name="/text_to_image")[0]
    t0 = time.time()
    with ThreadPoolExecutor(8) as ex: results = list(ex.map(one, range(8)))
    assert len(results) == 8 and all(r is not None for r in results)
    assert all(Image.open(r).size == (64, 64) for i, r in enumerate(results) if i % 4 != 3)
    print(f"8 concurrent requests in {time.time() - t0:.1f} s")

@pytest.mark.parametrize("call, message", [
    (lambda c, tmp: c.predict("   ", *args(T2I_CONTROLS, **FAST), api_name="/text_to_image"), "Enter a prompt"),
    (lambda c, tmp: c.predict("x", *args(T2I_CONTROLS, num_timesteps=7), api_name="/text_to_image"),
     "less than minimum value 10"),                   # gradio checks slider ranges before the backend does
    (lambda c, tmp: c.predict("x", *args(T2I_CONTROLS, cfg_renorm_type="local", **FAST), api_name="/text_to_image"),
     "local"),
    (lambda c, tmp: c.predict(None, "make it blue", *args(EDIT_CONTROLS, **FAST), api_name="/edit_image"),
     "Upload an image first"),
    (lambda c, tmp: c.predict(handle_file(str(tmp / "photo.png")), "", *args(UND_CONTROLS), api_name="/understand_image"),
     "Enter a prompt"),
])
def test_bad_requests_get_a_message_and_the_app_keeps_answering(client, served, call, message):
    _, tmp = served
    with pytest.raises(Exception, match=message):
        call(client, tmp)
    image, _ = client.predict("still alive", *args(T2I_CONTROLS, **FAST), api_name="/text_to_image")
    assert Image.open(image).size == (64, 64)

@pytest.mark.parametrize("mode, layer", [(2, "Linear4bit"), (3, "Linear8bitLt")])
def test_quantized_modes_serve_images(served, mode, layer):
    pytest.importorskip("bitsandbytes", reason="--mode 2/3 need bitsandbytes")
    _, tmp = served
    inf = load_inferencer(tmp / "cache" / "tiny-random-checkpoint", mode=mode)
    assert type(inf.model.language_model.model.layers[0].self_attn.q_proj).__name__ == layer
    image, thought = list(AppBackend(inf, image_size=32).text_to_image("a red circle", seed=1, **FAST))[-1]
    assert image.size == (32, 32) and thought == ""

# ---------------------------------------------------------------------------------------------------------------
# The browser

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--window-size=1100,1000"]

@pytest.fixture(scope="session")
def browser():
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium): the browser test needs it")
    chrome = next((p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p), None)
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip(f"needs Chromium and its driver (found chromium={chrome}, chromedriver={driver}): "
                    "apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for f in CHROME_FLAGS: opts.add_argument(f)
    d = webdriver.Chrome(options=opts, service=Service(driver))
    yield d
    d.quit()

def _ui(d):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    wait = lambda cond, t=60: WebDriverWait(d, t, poll_frequency=0.2).until(cond)
    css = lambda sel: d.find_element(By.CSS_SELECTOR, sel)
    def tab(label):
        d.find_element(By.XPATH, f"//button[@role='tab'][contains(., '{label}')]").click()
    def typed(sel, text):
        el = css(sel); el.send_keys(Keys.CONTROL, "a"); el.send_keys(Keys.BACKSPACE); el.send_keys(text, Keys.TAB)
    def click(sel): d.execute_script("arguments[0].click()", css(sel))   # not blocked by a toast on top
    def shot(path):
        for b in d.find_elements(By.CSS_SELECTOR, ".toast-close, button[aria-label='Close']"):
            try: b.click()
            except Exception: pass
        d.execute_script("window.scrollTo(0, 0)"); time.sleep(0.3); d.save_screenshot(str(path))
    def img_src(sel):
        els = d.find_elements(By.CSS_SELECTOR, f"{sel} img")
        return els[0].get_attribute("src") if els else None
    return wait, css, click, tab, typed, img_src, shot

def test_browser_drives_every_tab(browser, served):
    url, tmp = served
    d = browser
    wait, css, click, tab, typed, img_src, shot = _ui(d)
    d.get(url)
    wait(lambda d: d.find_elements("css selector", "#t2i-prompt textarea"))
    shots = tmp / "screenshots"; shots.mkdir(exist_ok=True)

    # a bad request: the message shows, the app keeps answering
    click("#t2i-run")
    wait(lambda d: "Enter a prompt first" in d.find_element("tag name", "body").text, 30)

    typed("#t2i-prompt textarea", "a red circle left of a blue square")
    typed("#t2i-num_timesteps input[type=number]", "10")
    click("#t2i-run")
    wait(lambda d: (img_src("#t2i-image") or "").startswith(("http", "data:")))
    wait(lambda d: not d.find_elements("css selector", "#t2i-image .progress-text, #t2i-image .eta-bar"), 60)
    shot(shots / "app_t2i.png")

    def with_photo(label, key, prompt, number, value, done):   # an image tab: upload, prompt, one number, run
        tab(label)
        wait(lambda d: css(f"#{key}-prompt textarea").is_displayed())
        css(f"#{key}-input input[type=file]").send_keys(str(tmp / "photo.png"))
        wait(lambda d: img_src(f"#{key}-input"))
        typed(f"#{key}-prompt textarea", prompt)
        typed(f"#{key}-{number} input[type=number]", value)
        click(f"#{key}-run")
        wait(done)
        shot(shots / f"app_{key}.png")
    with_photo("Image Edit", "edit", "make the square green", "num_timesteps", "10", lambda d: img_src("#edit-image"))
    with_photo("Image Understanding", "und", "what colour is the square?", "max_tokens", "64",
               lambda d: css("#und-answer textarea").get_attribute("value"))

    for name in ("app_t2i", "app_edit", "app_und"): assert (shots / f"{name}.png").stat().st_size > 1000
    if not DOCS_IMAGE.exists() or os.environ.get("BAGEL_UPDATE_DOCS_IMAGES"):   # made once for the docs, not per CI run
        DOCS_IMAGE.parent.mkdir(exist_ok=True)
        im = Image.open(shots / "app_t2i.png").convert("RGB")
        im.thumbnail((720, 720)); im.quantize(64).save(DOCS_IMAGE, optimize=True)
