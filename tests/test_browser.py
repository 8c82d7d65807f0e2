"""TensorBoard and optuna-dashboard in a real browser: a tiny run's folder served by `tensorboard` and a
two-trial search's study by `optuna-dashboard`, each dashboard opened in headless Chromium (Debian's
chromium and chromium-driver packages, driven by Selenium) and checked for that content, not only for an
answer from the server. The screenshots are saved in the test's temporary folder."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import FAST_TRAIN, SyntheticMNIST, free_port, train_on_synthetic

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs Chromium and its driver on the PATH: sudo apt-get install chromium chromium-driver",
    ),
]

# What a dashboard shows, read through every shadow root and same-origin frame (TensorBoard's
# dashboards are web components; the projector is a frame): its text, the chart lines drawn with
# more than one point, the images with their decoded sizes, and the canvases.
PAGE = """
const page = {text: [], lines: 0, images: [], canvases: 0};
function visit(node) {
  if (node.nodeType === Node.TEXT_NODE) { page.text.push(node.textContent.trim()); return; }
  if (node.nodeName === 'STYLE' || node.nodeName === 'SCRIPT') return;
  if (node.nodeName === 'path' && node.classList.contains('line') && (node.getAttribute('d') || '').includes('L')) {
    page.lines++;
  }
  if (node.nodeName === 'IMG' && node.complete) page.images.push([node.naturalWidth, node.naturalHeight]);
  if (node.nodeName === 'CANVAS' && node.width > 0) page.canvases++;
  if (node.shadowRoot) visit(node.shadowRoot);
  if (node.nodeName === 'IFRAME' && node.contentDocument) visit(node.contentDocument);
  node.childNodes.forEach(visit);
}
visit(document);
page.text = page.text.filter(Boolean).join('\\n');
return page;
"""


@dataclass
class Page:
    text: str
    lines: int
    images: list[list[int]]
    canvases: int


@pytest.fixture(scope="module")
def tensorboard(synthetic_mnist: SyntheticMNIST, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a TensorBoard serving one short default run, once every dashboard is ready."""
    workdir = tmp_path_factory.mktemp("browser")
    train_on_synthetic(synthetic_mnist, workdir, *FAST_TRAIN)
    address = f"http://127.0.0.1:{free_port()}"
    log = (workdir / "tensorboard.log").open("w")
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(workdir / "outputs")]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1]],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # The projector tells whether it has data only after a first look in the background.
        deadline, enabled = time.monotonic() + 120, False
        while not enabled:
            assert server.poll() is None and time.monotonic() < deadline, (workdir / "tensorboard.log").read_text()
            time.sleep(1)
            try:
                with urllib.request.urlopen(f"{address}/data/plugins_listing", timeout=5) as response:
                    enabled = json.load(response)["projector"]["enabled"]
            except OSError:  # not listening yet
                continue
        yield address
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


RUN = "tensorboard"  # the run's name ends with its folder: runs/<time>_<tag>/tensorboard

# Dashboard -> what it shows of the run once rendered.
DASHBOARDS: dict[str, Callable[[Page], bool]] = {
    # The curves of the tags the run logs; the 2 epochs of `epoch` are a line.
    "scalars": lambda page: {"test/acc", "test/loss", "epoch"} <= set(page.text.split("\n")) and page.lines >= 1,
    # Train against val on one chart per metric: two tags matched and drawn in each.
    "custom_scalars": lambda page: (
        {"train against val", "loss", "acc", "f1"} <= set(page.text.split("\n"))
        and page.text.replace("\n", " ").count("Matches (2)") == 3
        and page.lines >= 6
    ),
    # The run as a row, with its hyperparameters and metrics as columns.
    "hparams": lambda page: all(name in page.text for name in ("model.lr", "val/acc_best", f"/{RUN}")),
    # The test report's figures and the first layer's weights, decoded at their sizes.
    "images": lambda page: (
        {"test/confusion_matrix", "weights/first_layer"} <= set(page.text.split("\n"))
        and [700, 700] in page.images
        and [233, 233] in page.images
    ),
    # A drawn curve per digit.
    "pr_curves": lambda page: "test/pr_curve/class_9" in page.text and page.lines >= 10,
    # The 200 test digits' 64 activations, loaded into the 3-D view.
    "projector": lambda page: (
        "last_hidden_layer" in page.text
        and re.search(r"Points:\s+200\s+Dimension:\s+64\b", page.text) is not None
        and page.canvases >= 1
    ),
    # The traced network as a node of the graph.
    "graphs": lambda page: "MNISTClassifier" in page.text.replace("…", ""),
}


@pytest.mark.parametrize("dashboard", DASHBOARDS)
def test_dashboard_shows_the_run(tensorboard: str, browser: webdriver.Chrome, dashboard: str, tmp_path: Path) -> None:
    browser.get("about:blank")  # a fresh page: nothing left over from the previous dashboard
    browser.get(f"{tensorboard}/#{dashboard}")
    rendered = DASHBOARDS[dashboard]
    try:
        WebDriverWait(browser, 60, poll_frequency=0.5).until(lambda page: rendered(Page(**page.execute_script(PAGE))))
    except TimeoutException:
        page = Page(**browser.execute_script(PAGE))
        pytest.fail(f"{dashboard} did not render the run: {page.lines} lines, images {page.images}, text:\n{page.text}")
    finally:
        browser.save_screenshot(str(tmp_path / f"{dashboard}.png"))


@pytest.fixture(scope="module")
def dashboard(synthetic_mnist: SyntheticMNIST, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of optuna-dashboard (the `dashboard` extra) serving a two-trial search's study."""
    pytest.importorskip("optuna_dashboard")
    from tests.test_search import search

    workdir = tmp_path_factory.mktemp("dashboard")
    search(synthetic_mnist, workdir, workdir / "sweep", "hydra.sweeper.n_trials=2")
    address = f"http://127.0.0.1:{free_port()}"
    log = (workdir / "dashboard.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "optuna-dashboard"),
            f"sqlite:///{workdir / 'sweep' / 'optuna.db'}",
            *("--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1]),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (workdir / "dashboard.log").read_text()
            try:
                urllib.request.urlopen(f"{address}/api/studies", timeout=5).close()
                break
            except OSError:  # not listening yet
                time.sleep(0.5)
        yield address
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_optuna_dashboard_shows_the_searchs_study_and_its_trials(
    dashboard: str, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    browser.get("about:blank")
    browser.get(f"{dashboard}/dashboard/studies/1/trials")

    # The study by name, and its two trials with their state, the first one's parameters and value.
    def shown(page: Page) -> bool:
        lines = page.text.split("\n")
        return (
            {"mlp (id=1)", "Trial 0", "Trial 1", "model.lr"} <= set(lines)
            and lines.count("Complete") >= 2
            and "Value" in lines
        )

    try:
        WebDriverWait(browser, 60, poll_frequency=0.5).until(lambda page: shown(Page(**page.execute_script(PAGE))))
    except TimeoutException:
        pytest.fail(f"optuna-dashboard did not show the study:\n{Page(**browser.execute_script(PAGE)).text}")
    finally:
        browser.save_screenshot(str(tmp_path / "optuna_dashboard.png"))
