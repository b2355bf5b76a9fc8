"""report.html in a real headless browser (Chromium + chromedriver from the system packages).

The page must load every image, show the numbers of summary.json and per_case.csv, and log no
console error. In CI (``CI`` set, as .ci/run is run) a missing browser is a failure, not a skip:
.ci/run installs ``chromium`` and ``chromium-driver`` where they are missing.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import ndimage

from segpipe.cli.evaluate import main as evaluate_main
from segpipe.io import read_json, read_nifti, write_nifti

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
    # the command line, as a user runs it: folder mode, lesion-wise for the lesion label
    assert evaluate_main(["--pred", str(pred_dir), "--ref", str(phantom_root / "labelsTr"), "--out", str(out),
                          "--dataset-json", str(phantom_root), "--lesion-wise", "2", "--workers", "1"]) == 0
    return out, out / "report.html"


def test_report_renders_images_tables_and_no_console_errors(browser, evaluation):
    out, report = evaluation
    assert report == out / "report.html"
    log = _open(browser, report)
    assert [m for m in log if m["level"] in ("SEVERE", "WARNING")] == []

    images = _images(browser)
    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(images) == len(pngs) == 6  # best, median, worst for organ and for lesion
    assert all(i["width"] > 0 and i["height"] > 0 for i in images), images
    assert browser.execute_script("return "
                                  "document.querySelectorAll('img:not([src^=\"data:image/png;base64,\"])').length") == 0

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

    lesion = summary["lesion_wise"]["per_class"]["2"]
    lesion_cells = 0
    for cell in _cells(browser, "#lesions td[data-metric]"):
        if (cell["text"] != "n/a" and cell["data"]["metric"] in lesion
                and not isinstance(lesion[cell["data"]["metric"]], dict)):
            _assert_shows(cell["text"], lesion[cell["data"]["metric"]])
            lesion_cells += 1
    for span in _cells(browser, "#lesions span[data-stat]"):
        _assert_shows(span["text"], lesion[span["data"]["metric"]][span["data"]["stat"]])
        lesion_cells += 1
    assert lesion_cells == 9 + 2 * 3  # n_cases, 5 counts, 3 pooled ratios; Dice and F1 mean/std/median
    assert lesion["lesion_fn"] >= 1  # the missed lesion of the first case

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


def _run(root: Path, name: str, dice: list[float], hd95: list[float]) -> None:
    """A run folder as training and evaluation leave it (per_case.csv of class 1, a short history)."""
    run = root / name
    (run / "evaluation").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "data": {"root": "data/x", "fold": None}}))
    cases = [f"case_{i}" for i in range(len(dice))]
    (run / "splits.json").write_text(json.dumps({"train": ["t0"], "val": cases}))
    lines = ["case,class,class_name,dice,iou,hd95,assd,nsd,empty,image_diagonal_mm"]
    lines += [f"{c},1,organ,{d},{d / (2 - d)},{h},{h / 2},{d},False,50.0" for c, d, h in zip(cases, dice, hd95)]
    (run / "evaluation" / "per_case.csv").write_text("\n".join(lines) + "\n")
    (run / "history.csv").write_text("epoch,loss,val_loss,val_dice_organ\n1,0.5,0.6,0.7\n2,0.4,0.5,0.8\n")


def test_comparison_report_renders_plots_and_the_numbers_of_comparison_json(browser, tmp_path):
    exp = tmp_path / "exp"
    _run(exp, "dice", [0.5, 0.55, 0.6, 0.52, 0.58, 0.61], [4.0] * 6)
    _run(exp, "tversky", [0.6, 0.7, 0.8, 0.9, 0.65, 0.95], [3.0] * 5 + [float("nan")])
    assert evaluate_main(["--compare", str(exp)]) == 0
    out = exp / "comparison"
    log = _open(browser, out / "report.html")
    assert [m for m in log if m["level"] in ("SEVERE", "WARNING")] == []
    images = _images(browser)
    assert len(images) == 3 and all(i["width"] > 0 for i in images), images  # 2 box plots, training curves

    result = read_json(out / "comparison.json")
    spans = _cells(browser, "table.comparison span[data-stat]")
    assert len(spans) == len(result["summary"]) * 3  # mean, std, median of every (config, class, metric)
    for span in spans:
        data = span["data"]
        (entry,) = [s for s in result["summary"] if s["config"] == data["config"] and str(s["class"]) == data["class"]
                    and s["metric"] == data["metric"]]
        _assert_shows(span["text"], entry[data["stat"]])
    p_cells = _cells(browser, "#tests td[data-stat]")
    assert len(p_cells) == 2 * len(result["tests"])
    for cell in p_cells:
        (test,) = [t for t in result["tests"] if t["metric"] == cell["data"]["metric"]]
        assert float(cell["text"]) == pytest.approx(test[cell["data"]["stat"]], rel=1e-3)
