"""How long does the interactive report take to build, how big is it, and how fast does a browser draw it?

    python benchmarks/report_rate.py                 # ~1 min: one run of 10,000 tokens at 32 iterations, E=64
    python benchmarks/report_rate.py --tokens 2000   # a quicker look

A capture of one prefill run is made with the Huginn-shaped reference model (random weights), then for each of
``--repeats`` rounds: ``write_report`` (reading the run, the measures, every token's PCA, packing, writing), and,
where Chromium and chromedriver are installed, the time from loading the file in headless Chromium until the page
says it has drawn (``document.body.dataset.ready``), then the time a hover tooltip and a token panel take to appear.
The page's size is printed beside the states' size, since the file carries every number the browser may show.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import loopscope
from loopscope.models.demo_tokenizer import build_tokenizer
from loopscope.models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config
from loopscope.report import write_report


def capture(path: Path, tokens: int, steps: int) -> None:
    tokenizer = build_tokenizer()
    register()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), padded_vocab_size=len(tokenizer), block_size=max(512, tokens))
    model = RavenReferenceForCausalLM(config).eval()
    with loopscope.attach(model, path, tokenizer=tokenizer, mode="w"), torch.no_grad():
        model(torch.randint(3, len(tokenizer), (1, tokens)), num_steps=steps)


def browser():
    """Headless Chromium through Selenium, or None when either is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1600",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def open_page(driver, path: Path) -> float:
    start = time.perf_counter()
    driver.get(path.resolve().as_uri())
    while driver.execute_script("return document.body.dataset.ready") != "true":
        time.sleep(0.01)
    return time.perf_counter() - start


def interact(driver) -> tuple[float, float]:
    """Seconds until a hover's tooltip, then a click's token panel, appear (cell near the heatmap's middle)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    area = driver.find_element(By.CSS_SELECTOR, "#heatmap .nsewdrag")
    start = time.perf_counter()
    ActionChains(driver).move_to_element_with_offset(area, 5, 5).perform()
    while not driver.find_elements(By.CSS_SELECTOR, "#heatmap .hoverlayer .hovertext"):
        time.sleep(0.005)
    hover = time.perf_counter() - start
    start = time.perf_counter()
    ActionChains(driver).click().perform()
    while driver.find_element(By.ID, "token-panel").get_attribute("hidden") is not None:
        time.sleep(0.005)
    return hover, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        h5, html = Path(folder) / "long.h5", Path(folder) / "report.html"
        start = time.perf_counter()
        capture(h5, args.tokens, args.steps)
        print(f"capture: {args.tokens} tokens x {args.steps + 1} states, E=64, {time.perf_counter() - start:.1f} s")
        driver = browser()
        if driver is None:
            print("no chromium/chromedriver/selenium: timing the build only", file=sys.stderr)
        builds, loads, hovers, clicks = [], [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with loopscope.open(h5) as capture_file:
                write_report(capture_file, html)
            builds.append(time.perf_counter() - start)
            if driver is not None:
                loads.append(open_page(driver, html))
                hover, click = interact(driver)
                hovers.append(hover)
                clicks.append(click)
        if driver is not None:
            driver.quit()
        states = args.tokens * (args.steps + 1) * 64 * 4 / 1e6
        print(f"page: {html.stat().st_size / 1e6:.1f} MB (states stored: {states:.1f} MB float32)")
        for name, times in (("build", builds), ("browser load+draw", loads), ("hover", hovers), ("click", clicks)):
            if times:
                print(f"{name:>18}: best {min(times):.3f} s, median {statistics.median(times):.3f} s")


if __name__ == "__main__":
    main()
