"""report.html in a real headless browser (Chromium + chromedriver from the system packages).

The page must load every image, show the numbers of summary.json and per_case.csv, and log no
console error. In CI (``CI`` set, as .ci/run is run) a missing browser is a failure, not a skip:
.ci/run installs ``chromium`` and ``chromium-driver`` where they are missing.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from segpipe.evaluation.folders import evaluate_folders
from segpipe.io import read_json, read_nifti, write_nifti
from segpipe.reports.html import write_evaluation_report

CHROMEDRIVER = Path("/usr/bin/chromedriver")  # Debian's chromium-driver; never a downloaded one


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _require_browser():
    """Skip on a developer machine without the browser; fail in CI, where .ci/run must install it."""
    problems = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        problems.append('selenium is not installed (pip install -e ".[test]")')
    if _chromium() is None:
        problems.append("chromium is not installed (apt-get install chromium)")
    if not CHROMEDRIVER.is_file():
        problems.append(f"{CHROMEDRIVER} is missing (apt-get install chromium-driver)")
    if problems:
        message = "headless browser test needs: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run installs them)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--allow-file-access-from-files", "--window-size=1280,1024"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never looks for (or downloads) a driver.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver, path: Path) -> list[dict]:
    """Load ``path``, wait for every image, return the console messages of the load."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop messages of earlier pages
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    return driver.get_log("browser")


def _images(driver) -> list[dict]:
    return driver.execute_script(
        "return Array.from(document.images).map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight}))")


def _cells(driver, selector: str) -> list[dict]:
    """Every element matching ``selector``: its text and the data-* of itself and its ancestors."""
    return driver.execute_script("""
        return Array.from(document.querySelectorAll(arguments[0])).map(el => {
            const data = {};
            for (let node = el; node && node.dataset; node = node.parentElement)
                for (const [k, v] of Object.entries(node.dataset)) if (!(k in data)) data[k] = v;
            return {text: el.textContent.trim(), data: data};
        });""", selector)


def _assert_shows(text: str, value) -> None:
    """``text`` is ``value`` rounded to the digits shown ('n/a' for undefined)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        assert text == "n/a", (text, value)
        return
    decimals = len(text.split(".")[1]) if "." in text else 0
    assert abs(float(text) - float(value)) <= 0.5 * 10.0**-decimals + 1e-9, (text, value)


@pytest.fixture(scope="module")
def evaluation(phantom_root, tmp_path_factory):
    """An evaluation of imperfect predictions of the tiny phantoms (organ 1, lesion 2)."""
    root = tmp_path_factory.mktemp("browser_eval")
    pred_dir = root / "preds"
    refs = sorted((phantom_root / "labelsTr").glob("*.nii.gz"))
    for i, path in enumerate(refs):
        volume = read_nifti(path)
        label = volume.array.astype(np.uint8)
        pred = label.copy()
        organ = label == 1
        pred[organ & ~ndimage.binary_erosion(organ, iterations=1 + i % 2)] = 0  # organ too small
        if i == 0:
            pred[label == 2] = 0  # a missed lesion: HD95 undefined
        elif i == 1:
            pred[np.roll(label == 2, 2, axis=0) & (label == 0)] = 2  # lesion grown sideways
        write_nifti(pred_dir / path.name, pred, volume.affine)
    out = root / "evaluation"
    evaluate_folders(pred_dir, phantom_root / "labelsTr", out, class_names={1: "organ", 2: "lesion"}, workers=1)
    report = write_evaluation_report(out)
    return out, report


def test_report_renders_images_tables_and_no_console_errors(browser, evaluation):
    out, report = evaluation
    assert report == out / "report.html"
    log = _open(browser, report)
    assert [m for m in log if m["level"] in ("SEVERE", "WARNING")] == []

    images = _images(browser)
    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(images) == len(pngs) == 6  # best, median, worst for organ and for lesion
    assert all(i["width"] > 0 and i["height"] > 0 for i in images), images
    assert browser.execute_script("return document.querySelectorAll('img:not([src^=\"data:image/png;base64,\"])').length") == 0

    summary = read_json(out / "summary.json")
    shown = 0
    for cell in _cells(browser, "#summary td[data-metric]"):
        data, label = cell["data"], cell["data"]["class"]
        if label == "fg":
            _assert_shows(cell["text"], summary["foreground_mean"][data["metric"]])
            shown += 1
            continue
        entry = summary["per_class"][label]
        if data["metric"] in ("n_cases", "missed", "spurious"):
            _assert_shows(cell["text"], entry[data["metric"]])
            shown += 1
    for span in _cells(browser, "#summary span[data-stat]"):
        data = span["data"]
        entry = summary["per_class"][data["class"]]
        stats = (entry["metrics"] if data["table"] == "metrics" else entry["distances_worst_filled"])[data["metric"]]
        _assert_shows(span["text"], stats[data["stat"]])
        shown += 1
    # 2 classes x (3 counts + 6 statistics x 3 numbers) + 6 foreground means
    assert shown == 2 * (3 + 6 * 3) + 6
    assert summary["per_class"]["2"]["missed"] == 1  # the report holds an undefined-HD95 case

    with open(out / "per_case.csv", newline="") as f:
        rows = {(r["case"], r["class"]): r for r in csv.DictReader(f)}
    cells = _cells(browser, "#per-case td[data-metric]")
    assert len({(c["data"]["case"], c["data"]["class"]) for c in cells}) == len(rows) == 12
    for cell in cells:
        row = rows[cell["data"]["case"], cell["data"]["class"]]
        value = float(row[cell["data"]["metric"]])
        _assert_shows(cell["text"], None if math.isnan(value) else value)

    captions = _cells(browser, "figcaption")
    assert all("Dice" in c["text"] and "HD95" in c["text"] for c in captions)
    roles = {(c["data"]["class"], c["data"]["role"]) for c in _cells(browser, "figure")}
    assert roles == {(c, r) for c in ("1", "2") for r in ("best", "median", "worst")}


def test_the_browser_check_catches_broken_images_and_script_errors(browser, tmp_path):
    """The assertions above could fail: a broken image and a script error are both seen."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="missing.png" alt="x">'
                    "<script>console.error('boom')</script></body></html>")
    log = _open(browser, page)
    assert _images(browser)[0]["width"] == 0
    messages = " ".join(m["message"] for m in log if m["level"] == "SEVERE")
    assert "missing.png" in messages and "boom" in messages
