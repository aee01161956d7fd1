"""``blipkit demo`` in a real headless browser: a real server process with a tiny trained model, driven
through Debian's Chromium. Uploads show the caption Python gives, questions get the answer Python gives,
a bad image shows a readable error, search lists the folder's images, and the page asks nothing of the
internet."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from blipkit.cli import cli
from blipkit.config import load_recipe
from blipkit.train.runner import train

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "what color is the shape?"
WAIT_MS = 20_000
# Set to a folder to keep screenshots of the page (docs/web-demo.md shows one).
SCREENSHOTS = os.environ.get("BLIPKIT_DEMO_SCREENSHOTS")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web-demo")


@pytest.fixture(scope="module")
def run_dir(root: Path) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLIPKIT_CACHE", str(root / "cache"))
        train(load_recipe("tiny", ["stage1.steps=1", "stage2.steps=1"]), output=root / "run", quiet=True)
    return root / "run"


@pytest.fixture(scope="module")
def shapes(root: Path) -> Path:
    folder = root / "shapes"
    result = CliRunner().invoke(cli, ["shapes", str(folder), "--num-images", "3"])
    assert result.exit_code == 0, result.output
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


class Server:
    """``blipkit demo`` started as a subprocess; ``url()`` waits until it answers."""

    def __init__(self, run_dir: Path, images: Path, workdir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = workdir / "demo.log"
        env = {**os.environ, "BLIPKIT_CACHE": str(workdir / "cache"), "GRADIO_TEMP_DIR": str(workdir / "gradio"),
               "OMP_NUM_THREADS": "1"}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "blipkit", "demo", "--model", str(run_dir), "--port", str(self.port),
                 "--images", str(images)], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.ready = False

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def url(self, timeout: float = 90) -> str:
        address = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.process.poll() is not None:
                pytest.fail(f"blipkit demo exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"blipkit demo did not answer within {timeout:.0f} s:\n{self.output()}")
            try:
                with urllib.request.urlopen(address, timeout=2) as response:
                    self.ready = response.status == 200
            except OSError:
                time.sleep(0.3)
        return address

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def server(run_dir: Path, shapes: Path, root: Path) -> Iterator[Server]:
    demo = Server(run_dir, shapes, root)
    yield demo
    demo.stop()


@pytest.fixture(scope="module")
def expected(run_dir: Path, shapes: Path, server: Server) -> dict[str, Any]:
    """What Python gives for the first shapes image, computed while the server starts."""
    import blipkit
    from blipkit.data.images import load_image

    model = blipkit.load(run_dir)
    image = load_image(shapes / "test-0000.png")
    return {"caption": model.caption([image])[0], "answer": model.ask([image], [QUESTION])[0]}


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("the browser tests need Debian's Chromium, which is not installed: apt-get install chromium "
                    "(scripts/setup.sh installs it when run as root)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, server: Server, expected: dict[str, Any]) -> Iterator[Any]:
    """A fresh page on the demo; on teardown, checks that it asked nothing of any other host."""
    url = server.url()
    context = browser.new_context(viewport={"width": 1200, "height": 820}, service_workers="block")
    tab = context.new_page()
    requests: list[str] = []
    tab.on("request", lambda request: requests.append(request.url))
    tab.goto(url)
    yield tab
    context.close()
    elsewhere = [u for u in requests if not u.startswith((url + "/", "data:", "blob:")) and u != url]
    assert elsewhere == [], f"the page reached beyond the demo server: {elsewhere}"


def _upload(page: Any, path: Path) -> None:
    page.locator("input[type=file]").first.set_input_files(str(path))


def _screenshot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / name))


@pytest.mark.browser
def test_upload_shows_the_caption_and_questions_get_answers(page: Any, shapes: Path, expected: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    assert expected["caption"].strip() and expected["answer"].strip()  # a blank text would prove nothing
    _upload(page, shapes / "test-0000.png")
    expect(page.get_by_label("Caption")).to_have_value(expected["caption"], timeout=WAIT_MS)
    _screenshot(page, "web-demo-caption.png")

    page.get_by_role("tab", name="Ask").click()
    page.get_by_label("Question").fill(QUESTION)
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_label("Answer")).to_have_value(expected["answer"], timeout=WAIT_MS)

    page.get_by_role("tab", name="Attention").click()
    page.get_by_role("button", name="Show attention").click()
    heatmap = page.locator("#heatmap img")
    expect(heatmap).to_be_visible(timeout=WAIT_MS)
    assert heatmap.evaluate("img => img.naturalWidth") >= 320


@pytest.mark.browser
def test_a_bad_image_shows_a_readable_error_and_the_demo_goes_on(
    page: Any, shapes: Path, server: Server, expected: dict[str, Any]
) -> None:
    from playwright.sync_api import expect

    _upload(page, shapes / "broken.png")
    expect(page.get_by_text("broken.png: cannot be read as an image")).to_be_visible(timeout=WAIT_MS)
    assert "Traceback" not in page.locator("body").inner_text()
    page.get_by_role("button", name="Clear").first.click()
    _upload(page, shapes / "test-0000.png")
    expect(page.get_by_label("Caption")).to_have_value(expected["caption"], timeout=WAIT_MS)
    assert "Traceback" not in server.output()


@pytest.mark.browser
def test_search_lists_the_folders_images_best_first(page: Any, shapes: Path) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Search").click()
    expect(page.get_by_label("Folder")).to_have_value(str(shapes))
    page.get_by_label("Looking for").fill("a red circle")
    page.get_by_role("button", name="Search").click()
    captions = page.locator("#results .caption-label")
    expect(captions).to_have_count(3, timeout=WAIT_MS)
    expect(page.get_by_text("skipped 1 unreadable image(s)")).to_be_visible()
    _screenshot(page, "web-demo-search.png")
    rows = [text.split(maxsplit=1) for text in captions.all_inner_texts()]
    assert sorted(name for _, name in rows) == sorted(p.name for p in shapes.glob("test-*.png"))
    scores = [float(score) for score, _ in rows]
    assert scores == sorted(scores, reverse=True)


def test_without_gradio_the_demo_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any model is loaded: the run named here does not even exist."""
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    for switch in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_RUN_HISTORY"):
        monkeypatch.setenv(switch, "False")  # restored afterwards: the demo sets them for the process
    result = CliRunner().invoke(cli, ["demo", "--model", str(tmp_path / "no-run")])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["Error: the web demo needs Gradio, which is not installed: "
                                                  "pip install 'blipkit[demo]'"]
