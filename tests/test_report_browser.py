"""The report in a real browser (headless Chromium driven by Selenium): it renders, a hovered cell names its token,
step and distance, a click opens the token's panel, the run selector switches runs, and a long run gets its overview.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). Without them the tests skip, unless
``LOOPSCOPE_REQUIRE_TOOLS=1`` (as in CI), where a missing browser is a failure, not a silent skip.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

import loopscope
from loopscope.models.demo import run_demo
from loopscope.models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config
from loopscope.report import write_report
from loopscope.report.page import WINDOW, page_data
from loopscope.report.page import unpacked as array
from loopscope.storage.merge import merge

FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1400,1600",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _unavailable(reason: str):
    if os.environ.get("LOOPSCOPE_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{reason} (LOOPSCOPE_REQUIRE_TOOLS=1: install chromium and chromium-driver)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")

    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        _unavailable("no chromium and chromedriver on PATH")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


class Page:
    """The report open in the browser, with the few gestures the tests make."""

    def __init__(self, driver, path):
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        driver.get(path.resolve().as_uri())
        deadline = time.monotonic() + 30
        while driver.execute_script("return document.body.dataset.ready") != "true":
            assert time.monotonic() < deadline, "the page never finished drawing"
            time.sleep(0.05)
        self.errors()  # a clean start: no script errors while loading

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def find_all(self, css: str):
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def errors(self) -> None:
        severe = [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe

    def _at(self, plot: str, row: float, rows: int, column: int, columns: int):
        """The mouse over cell (row, column) of a heatmap whose axes show ``rows`` x ``columns`` cells."""
        from selenium.webdriver.common.action_chains import ActionChains

        area = self.find(f"#{plot} .nsewdrag")
        box = area.rect
        dx = (column + 0.5) / columns * box["width"] - box["width"] / 2
        dy = (row + 0.5) / rows * box["height"] - box["height"] / 2
        return ActionChains(self.driver).move_to_element_with_offset(area, round(dx), round(dy))

    def hover(self, plot: str, row: int, rows: int, column: int, columns: int) -> str:
        self._at(plot, row, rows, column, columns).perform()
        deadline = time.monotonic() + 5
        while not (tips := self.find_all(f"#{plot} .hoverlayer .hovertext")):
            assert time.monotonic() < deadline, "no tooltip appeared"
            time.sleep(0.05)
        return tips[0].text

    def click(self, plot: str, row: int, rows: int, column: int, columns: int) -> None:
        self._at(plot, row, rows, column, columns).click().perform()
        time.sleep(0.3)

    def screenshot(self, path) -> None:
        assert self.driver.save_screenshot(str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    """The report `loopscope demo` writes (with the lens of the shipped model)."""
    return run_demo(tmp_path_factory.mktemp("demo"), steps=16, max_new_tokens=4).report


def test_the_demo_report_hovers_and_opens_a_token(browser, demo_report, tmp_path):
    page = Page(browser, demo_report)
    view = page_data(demo_report)["runs"][0]
    tokens, steps = view["shape"]
    assert page.find_all("#heatmap .hm image"), "the heatmap did not render"
    assert page.find("#overview-section").get_attribute("hidden") is not None  # a short run needs no overview
    t, k = tokens // 2, 5
    tip = page.hover("heatmap", t, tokens, k, steps)
    distance = array(view["distance"])[t, k]
    assert f"token {t}: {view['labels'][t]}" in tip and f"iteration {k}" in tip
    assert f"{distance:.4g}"[:4] in tip.replace("e-0", "e-")
    page.click("heatmap", t, tokens, k, steps)
    assert page.find("#token-panel").get_attribute("hidden") is None
    assert page.find("#token-title").text.startswith(f"Token {t}:")
    assert len(page.find_all("#token-curves .scatterlayer .trace")) == 2  # distance and step size
    assert page.find_all("#token-pca .scatterlayer .point")
    last = int(array(view["last"])[t])
    rows = page.find_all("#token-lens table.lens tr")
    assert len(rows) == 1 + last + 1  # a header and one row per stored step
    top1 = array(view["lens"]["top_ids"])[t, last, 0]
    assert view["lens"]["vocab"][str(top1)] in rows[-1].text
    page.screenshot(tmp_path / "demo-report.png")
    page.errors()


@pytest.fixture(scope="module")
def merged_report(two_run_capture, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merged")
    a = two_run_capture(folder / "a.h5", "First capture.", 3, 2, 4)
    b = two_run_capture(folder / "b.h5", "Second one, longer.", 5, 3, 6)
    merge(folder / "m.h5", [a, b])
    return write_report(loopscope.open(folder / "m.h5"), folder / "report.html")


def test_the_run_selector_switches_runs_of_a_merged_capture(browser, merged_report):
    from selenium.webdriver.support.ui import Select

    page = Page(browser, merged_report)
    runs = page_data(merged_report)["runs"]
    select = Select(page.find("#run-select"))
    assert [o.text for o in select.options] == [r["label"] for r in runs] and len(runs) == 4
    select.select_by_index(3)
    time.sleep(0.3)
    assert page.find("#heatmap .gtitle").text == runs[3]["label"]
    tokens, steps = runs[3]["shape"]
    tip = page.hover("heatmap", tokens - 1, tokens, 1, steps)
    assert f"token {tokens - 1}: {runs[3]['labels'][tokens - 1]}" in tip
    page.errors()


def test_an_hrm_text_report_shows_each_loop(browser, hrm_capture, new_hrm_text_model, tmp_path):
    report = write_report(loopscope.open(hrm_capture), tmp_path / "report.html", model=new_hrm_text_model())
    from selenium.webdriver.support.ui import Select

    page = Page(browser, report)
    Select(page.find("#run-select")).select_by_index(1)
    time.sleep(0.3)
    assert "loop L" in page.find("#heatmap .gtitle").text
    assert any("no lens predictions" in li.text for li in page.find_all("#notes li"))
    runs = page_data(report)["runs"]
    tokens, steps = runs[1]["shape"]
    page.click("heatmap", 3, tokens, 1, steps)
    assert page.find("#token-title").text.startswith("Token 3:")
    assert not page.find_all("#token-lens table")  # L has no readout: no predictions, and no error
    for plot in ("heatmap", "token-curves"):  # a short loop's step axes: whole numbers, no 0.5
        ticks = [tick.text for tick in page.find_all(f"#{plot} .xtick text")]
        assert ticks and all(tick.isdigit() for tick in ticks), (plot, ticks)
    page.errors()


def test_a_long_run_gets_an_overview_that_moves_the_window(browser, tokenizer, tmp_path):
    register()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), padded_vocab_size=len(tokenizer), block_size=2048)
    model = RavenReferenceForCausalLM(config).eval()
    n = 3 * WINDOW + 10
    path = tmp_path / "long.h5"
    with loopscope.attach(model, path, tokenizer=tokenizer), torch.no_grad():
        model(torch.randint(3, len(tokenizer), (1, n)), num_steps=4)
    report = write_report(loopscope.open(path), tmp_path / "report.html")
    page = Page(browser, report)
    assert page.find("#overview-section").get_attribute("hidden") is None
    assert page.find("#window-text").text.startswith(f"tokens 0–{WINDOW - 1} of {n}")
    blocks, steps = len(page.driver.execute_script("return document.getElementById('overview').data[0].y")), 5
    page.click("overview", blocks - 1, blocks, 2, steps)  # the last block: the window moves to the run's end
    assert page.find("#window-text").text.startswith(f"tokens {n - WINDOW}–{n - 1} of {n}")
    page.find("#prev").click()
    assert page.find("#window-text").text.startswith(f"tokens {n - WINDOW - WINDOW // 2}–")
    tip = page.hover("heatmap", 0, WINDOW, 1, steps)
    assert f"token {n - WINDOW - WINDOW // 2}:" in tip
    assert np.isfinite(array(page_data(report)["runs"][0]["distance"])[:, :5]).all()
    page.errors()


class HostileTokenizer:
    """Token texts that would run as script or markup if the page ever treated them as HTML, and invisible format
    characters (a right-to-left override, a line separator) that would reorder or break the panel's title."""

    TEXTS = (
        "</script><script>window.pwned = 1</script>",
        "<img src=x onerror=window.pwned=2>",
        "<b>b</b>",
        "&lt;",
        "\u202eRTL\u200f",
        "a\u2028b\u2029",
    )

    def decode(self, ids) -> str:
        return self.TEXTS[int(ids[0]) % len(self.TEXTS)]


def test_hostile_token_text_is_shown_as_text(browser, new_reference_model, tmp_path):
    path, model = tmp_path / "hostile.h5", new_reference_model()
    with loopscope.attach(model, path, tokenizer=HostileTokenizer()), torch.no_grad():
        model(torch.arange(8)[None, :], num_steps=3)
    report = write_report(loopscope.open(path), tmp_path / "report.html")
    page = Page(browser, report)
    assert page.driver.execute_script("return window.pwned") is None
    assert not page.find_all("#heatmap img, #token-panel img, b")  # no element made from a token's text
    view = page_data(report)["runs"][0]
    for t in range(len(HostileTokenizer.TEXTS)):
        text = HostileTokenizer.TEXTS[t]
        assert view["tokens"][t] == text
        tip = page.hover("heatmap", t, 8, 1, 4)
        assert view["labels"][t] in tip  # the characters themselves, cut to a label's length
        page.click("heatmap", t, 8, 1, 4)
        assert page.find("#token-title").text == f"Token {t}: {json.dumps(text)}"  # "\u202eRTL\u200f" as escapes
    assert page.driver.execute_script("return window.pwned") is None
    page.errors()
