"""`dbtrain ui` in a real browser: Playwright driving headless Chromium (Debian's, launched by its path)
against the app on 127.0.0.1, started and stopped here. Train: 4 photos and their masks, "Will it fit?", a short
run on the built-in model, the loss plot gaining points and a validation image, Stop (a checkpoint), Resume to the end;
a second start while it runs is refused. Sample: images from the run's model into the run's folder. FABRIC:
a round, one like and one dislike, the next round steered by them. Bad input: the CLI's one line on the page.

DBTRAIN_UI_SCREENSHOTS=DIR saves a screenshot of each page there (docs/img/ui-*.png are made so)."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="Gradio is not installed (pip install '.[ui]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (requirements-ui-test.txt)")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in (os.environ.get("DBTRAIN_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser")) if p and Path(p).is_file()), None)
if CHROMIUM is None:
    pytest.skip("Chromium is not installed and could not be (Debian: apt-get install chromium; .ci/run does it)",
                allow_module_level=True)
# as root in a container, offline: no sandbox, nothing that phones home
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TRAIN_FLAGS = "--device cpu --optimizer adamw --num_validation_images 1"
SHOTS = os.environ.get("DBTRAIN_UI_SCREENSHOTS")
SLACK = float(os.environ.get("DBTRAIN_UI_TEST_SLACK", "4"))  # every wait's timeout times this


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on a free loopback port, its runs in a temporary folder; stopped as Ctrl-C stops it."""
    work = tmp_path_factory.mktemp("ui")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False")
    log = open(work / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "ui", "--port", str(port), "--runs_dir",
                             str(work / "runs")], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120 * SLACK
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"dbtrain ui did not start: {(work / 'app.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"url": url, "runs": work / "runs", "work": work}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def page(app):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000 * SLACK)
        pg.goto(app["url"])
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from trainer.world.scenes import subject_images

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for k, im in enumerate(subject_images()[:4]):
        im.save(folder / f"star{k}.png")
        paths.append(str(folder / f"star{k}.png"))
    return paths


@pytest.fixture(scope="module")
def masks(tmp_path_factory, photos):
    """A mask per photo, of its name and size (white: the whole picture trains)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("masks")
    for p in photos:
        with Image.open(p) as im:
            Image.new("L", im.size, 255).save(folder / Path(p).name)
    return [str(folder / Path(p).name) for p in photos]


def _upload(page, elem_id, files):
    """Files into a gr.File, replacing what it holds (a second upload would add to them)."""
    clear = page.locator(f"#{elem_id} button[aria-label=Clear]")
    if clear.count():
        clear.first.click()
        _wait(lambda: page.locator(f"#{elem_id} button[aria-label='Remove this file']").count() == 0, 30)
    page.locator(f"#{elem_id} input[type=file]").set_input_files(files)


def _tab(page, name):
    page.get_by_role("tab", name=name).click()


def _fill(page, elem_id, value):
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(str(value))


def _text(page, elem_id) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _wait(what, timeout=120.0, every=0.5):
    """what() until it is true; the timeouts are generous (x SLACK): a shared 2-core machine can be 10x slower."""
    deadline = time.time() + timeout * SLACK
    while time.time() < deadline:
        got = what()
        if got:
            return got
        time.sleep(every)
    try:
        source = inspect.getsource(what).strip()
    except (OSError, TypeError):
        source = repr(what)
    raise AssertionError(f"timed out after {timeout * SLACK:.0f} s waiting for: {source}")


def _state(page) -> dict:
    el = page.locator("#train-progress .run-progress")
    if el.count() == 0:
        return {}
    return {k: el.get_attribute(f"data-{k}") for k in ("state", "step", "total")}


def _shot(page, name):
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"ui-{name}.png"), full_page=True)


def test_bad_input_shows_the_clis_message(page, photos):
    _tab(page, "Train")
    _upload(page, "train-photos", photos[:2])
    _wait(lambda: "3 to 20 photos" in _text(page, "train-message"), 30)
    page.locator("#train-start").click()
    _wait(lambda: "got 2" in _text(page, "train-message"), 30)
    # four photos, a flag that does not parse: argparse's own line, nothing started
    _upload(page, "train-photos", photos)
    _wait(lambda: "4 photos" in _text(page, "train-message"), 30)
    _fill(page, "train-other", "--learning_rate fast")
    page.locator("#train-start").click()
    _wait(lambda: "invalid float value: 'fast'" in _text(page, "train-message"), 30)
    assert _state(page).get("state") == "no run yet"
    # a check of the CLI's own, after parsing: a min-SNR gamma that is not > 0
    _fill(page, "train-other", "--snr_gamma -1")
    page.locator("#train-start").click()
    _wait(lambda: "dbtrain: error:" in _text(page, "train-message") and "snr_gamma" in _text(page, "train-message"),
          30)
    _fill(page, "train-other", "")


def test_train_stop_resume(page, app, photos, masks):
    _tab(page, "Train")
    _upload(page, "train-photos", photos)
    _wait(lambda: page.locator("#train-preview img").count() == 4, 30)
    page.locator("#train-masks input[type=file]").set_input_files(masks)  # white: train everywhere
    _wait(lambda: "mask star3.png" in _text(page, "train-preview"), 30)
    _fill(page, "train-steps", 300)
    _fill(page, "train-val-steps", 20)
    _fill(page, "train-other", TRAIN_FLAGS)
    page.locator("#train-fit").click()  # dbtrain estimate with these flags, for the 24 GB card chosen
    _wait(lambda: "fits the 24 GB card" in _text(page, "train-verdict"), 120)
    assert "dbtrain estimate" in _text(page, "train-verdict")
    page.locator("#train-start").click()

    def points():
        return page.locator("#train-loss circle.loss-point").count()
    first = _wait(lambda: points() >= 3 and points(), 180)
    _wait(lambda: points() > first, 60)  # the plot gains points as the run logs
    _wait(lambda: page.locator("#train-validation img").count() >= 1, 120)
    assert "dbtrain train --instance_data_dir" in _text(page, "train-where")
    assert "--mask_dir" in _text(page, "train-where")
    # a second start while it runs: refused, the run goes on
    page.locator("#train-start").click()
    _wait(lambda: "run is going" in _text(page, "train-message"), 30)
    _shot(page, "train")
    page.locator("#train-stop").click()
    _wait(lambda: (_state(page).get("state") or "").startswith("stopped"), 120)
    stopped_at = int(_state(page)["step"])
    assert 0 < stopped_at < 300, _state(page)
    (run,) = [p for p in app["runs"].iterdir() if p.name.startswith("train-")]
    assert sorted(p.name for p in (run / "model").glob("checkpoint-*")), "Stop saved no checkpoint"
    assert "SIGINT" in _text(page, "train-run-message")
    page.locator("#train-resume").click()
    _wait(lambda: _state(page).get("state") == "finished", 240)
    records = [json.loads(ln) for ln in (run / "model" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 300
    assert (run / "model" / "model_index.json").is_file()
    assert "resume_from_checkpoint" in (run / "ui-train.log").read_text()
    assert points() >= 250


def test_sample_from_the_run(page, app):
    _tab(page, "Sample")
    (run,) = [p for p in app["runs"].iterdir() if p.name.startswith("train-")]
    _fill(page, "sample-model", str(run / "model"))
    page.keyboard.press("Enter")
    _fill(page, "sample-prompt", "a sks star in the snow")
    page.locator("#sample-go").click()
    _wait(lambda: page.locator("#sample-gallery img").count() == 4, 180)
    (folder,) = (run / "samples").iterdir()
    assert sorted(p.name for p in (folder / "images").glob("0*.png")) == ["000.png", "001.png", "002.png", "003.png"]
    assert "dbtrain sample --model" in _text(page, "sample-where")
    _shot(page, "sample")


def test_fabric_round_like_next(page, app):
    _tab(page, "FABRIC")
    _fill(page, "fabric-prompt", "a star on the beach")
    page.locator("#fabric-first").click()
    _wait(lambda: page.locator("#fabric-img-3 img").count() == 1, 180)
    page.locator("#fabric-like-1").click()
    _wait(lambda: "liked" in _text(page, "fabric-mark-1"), 30)
    page.locator("#fabric-dislike-2").click()
    _wait(lambda: "disliked" in _text(page, "fabric-mark-2"), 30)
    page.locator("#fabric-next").click()
    _wait(lambda: "round 2: 1 liked, 1 disliked" in _text(page, "fabric-counts"), 180)
    _wait(lambda: page.locator("#fabric-earlier img").count() >= 4, 30)  # round 1 stays visible
    (session,) = [p for p in app["runs"].iterdir() if p.name.startswith("fabric-")]
    rec = json.loads((session / "session.json").read_text())
    second = rec["rounds"][1]["argv"]
    assert second[second.index("--liked") + 1].endswith("round-1/001.png")
    assert second[second.index("--disliked") + 1].endswith("round-1/002.png")
    assert (session / "round-2" / "000.png").is_file()
    # the liked image downloads as it was drawn
    with page.expect_download() as got:
        page.locator("#fabric-liked a").first.click()
    assert got.value.suggested_filename == "round-1-001.png"
    assert Path(got.value.path()).read_bytes() == (session / "round-1" / "001.png").read_bytes()
    _shot(page, "fabric")
