"""Progress plot, overlay slice chooser, intensity windows, case choice and the HTML tables (no browser)."""
from __future__ import annotations

import io
import math
import subprocess
import sys
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from segpipe.reports import overlays  # noqa: E402
from segpipe.reports.html import evaluation_report_html, png_data_uri  # noqa: E402
from segpipe.reports.overlays import (  # noqa: E402
    choose_cases,
    crop_box,
    error_slices,
    intensity_window,
    render_overlay,
    slice_aspect,
    view_names,
)
from segpipe.reports.progress import best_epoch, plot_progress, progress_figure, read_history, write_progress_plot  # noqa: E402

# ---------------------------------------------------------------- the slice of largest error


def test_error_slices_pick_the_slice_of_largest_error_per_axis():
    ref = np.zeros((10, 12, 14), bool)
    ref[2:8, 2:10, 2:12] = True
    pred = ref.copy()
    # Errors, chosen so that each axis has a different winner:
    pred[6, 3:9, 4:10] = False  # 36 missed voxels, all in x = 6, spread over y 3..8 and z 4..9
    pred[2:8, 11, 5] = True  # 6 extra voxels at y = 11, z = 5 (x 2..7)
    # x: slice 6 holds 36 + 1 errors, others 1 -> 6.
    # y: slices 3..8 hold 6 each (+0), y = 11 holds 6 -> tie of 6 between y 3..8 and 11; union
    #    breaks it: y in 3..8 has 60 union voxels, y = 11 has 6 -> the lowest of 3..8: 3.
    # z: z 4..9 hold 6 each, z = 5 holds 6 + 6 = 12 -> 5.
    assert error_slices(ref, pred) == (6, 3, 5)


def test_error_slices_without_error_or_structure():
    ref = np.zeros((9, 9, 9), bool)
    assert error_slices(ref, ref) == (4, 4, 4)  # nothing anywhere: the middle slices
    ref[1:3, 5:8, 6] = True  # perfect prediction: the largest union per axis
    ref[1, 5, 2] = True
    assert error_slices(ref, ref.copy()) == (1, 5, 6)


def test_error_slices_single_wrong_voxel():
    ref = np.zeros((6, 7, 8), bool)
    pred = ref.copy()
    pred[4, 1, 6] = True  # one spurious voxel: every view must show it
    assert error_slices(ref, pred) == (4, 1, 6)


# ---------------------------------------------------------------- windows, crop, aspect, views


def test_intensity_window_is_robust_for_mr_and_ct():
    rng = np.random.default_rng(0)
    mr = rng.normal(400, 50, size=(30, 30, 30))
    mr[0, 0, :5] = 1e5  # a handful of hot voxels
    low, high = intensity_window(mr)
    assert 200 < low < 300 and 500 < high < 600  # the bulk, not the outliers

    ct = np.full((40, 40, 40), -1000.0)  # air around the body
    ct[8:32, 8:32, 8:32] = rng.normal(40, 15, size=(24, 24, 24))  # soft tissue
    ct[18:22, 18:22, 18:22] = 1200.0  # a bone
    body = (slice(10, 30), slice(10, 30), slice(10, 30))
    low, high = intensity_window(ct, region=body)  # the region the overlay shows
    assert -20 < low < 40 and high == pytest.approx(1200.0)  # soft tissue to bone (0.8 %), no air
    low, high = intensity_window(ct)  # the whole scan: air dominates; the bone (0.1 %) is above 99.5 %
    assert low == -1000.0 and 40 < high < 200


def test_intensity_window_constant_and_nan():
    assert intensity_window(np.full((3, 3, 3), 7.0)) == (6.5, 7.5)
    image = np.full((4, 4, 4), np.nan)
    image[0, 0, 0], image[1, 1, 1] = 1.0, 3.0
    assert intensity_window(image, percentiles=(0, 100)) == (1.0, 3.0)
    with pytest.raises(ValueError, match="percentiles"):
        intensity_window(image, percentiles=(50, 10))


def test_crop_box_adds_the_margin_in_mm():
    ref = np.zeros((40, 40, 20), bool)
    ref[18:22, 10:12, 9:11] = True
    box = crop_box(ref, ref, spacing_mm=(1.0, 1.0, 2.5), margin_mm=5.0)
    assert box == (slice(13, 27), slice(5, 17), slice(7, 13))  # 5 vox, 5 vox, ceil(5 / 2.5) = 2 vox
    assert crop_box(ref, ref, spacing_mm=(1, 1, 1), margin_mm=None) == (slice(0, 40), slice(0, 40), slice(0, 20))
    assert crop_box(ref, ref, spacing_mm=(1, 1, 1), margin_mm=100.0)[0] == slice(0, 40)  # clipped


def test_aspect_and_view_axes_follow_spacing_and_affine():
    assert slice_aspect((1.0, 1.0, 3.0), vertical_axis=2, horizontal_axis=0) == 3.0
    ras = np.diag([0.8, 0.8, 3.0, 1.0])
    assert view_names(ras) == ["sagittal (axis 0)", "coronal (axis 1)", "axial (axis 2)"]
    codes = ("R", "A", "S")
    assert overlays._view_axes(2, codes) == (1, 0)  # axial: anterior up, x across
    assert overlays._view_axes(1, codes) == (2, 0)  # coronal: superior up
    assert overlays._view_axes(0, codes) == (2, 1)  # sagittal: superior up
    # A volume stored (z, y, x): the axial view is across axis 0 and superior is axis 0.
    zyx = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    assert view_names(zyx)[0] == "axial (axis 0)"
    assert overlays._view_axes(2, ("S", "A", "R")) == (0, 1)  # sagittal across axis 2: superior (0) up
    assert view_names(None) == ["axis 0", "axis 1", "axis 2"]


def _case(shape=(24, 28, 12)):
    rng = np.random.default_rng(1)
    ref = np.zeros(shape, bool)
    ref[8:16, 10:20, 4:8] = True
    pred = np.roll(ref, 2, axis=0)
    image = 100 + 50 * ref + rng.normal(0, 5, shape)
    return image, ref, pred


def _pixels(png: bytes) -> np.ndarray:
    return mpimg.imread(io.BytesIO(png), format="png")[..., :3]


def _count_color(pixels: np.ndarray, hex_color: str) -> int:
    rgb = np.array(matplotlib.colors.to_rgb(hex_color))
    return int(np.sum(np.all(np.abs(pixels - rgb) < 0.08, axis=-1)))


def test_render_overlay_draws_both_contours_and_the_caption():
    image, ref, pred = _case()
    png = render_overlay(image, ref, pred, spacing_mm=(1.0, 1.0, 3.0), affine=np.diag([1, 1, 3, 1.0]),
                         caption="case_7, lesion: Dice 0.750")
    pixels = _pixels(png)
    assert _count_color(pixels, overlays.REFERENCE_COLOR) > 50
    assert _count_color(pixels, overlays.PREDICTION_COLOR) > 50
    assert png_data_uri(png).startswith("data:image/png;base64,iVBOR")


def test_render_overlay_uses_the_spacing_for_the_aspect(monkeypatch):
    image, ref, pred = _case()
    seen = []
    original = matplotlib.axes.Axes.imshow

    def spy(self, data, *args, **kwargs):
        seen.append((np.shape(data), kwargs.get("aspect")))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    render_overlay(image, ref, pred, spacing_mm=(1.0, 2.0, 3.0), margin_mm=None)
    # No affine: the view across axis a shows the higher remaining axis vertically.
    assert seen == [((12, 28), 3.0 / 2.0), ((12, 24), 3.0 / 1.0), ((28, 24), 2.0 / 1.0)]


def test_render_overlay_without_image_and_bad_shapes():
    _, ref, pred = _case()
    assert _count_color(_pixels(render_overlay(None, ref, pred, spacing_mm=(1, 1, 1))), overlays.PREDICTION_COLOR) > 0
    with pytest.raises(ValueError, match="shape of the masks"):
        render_overlay(np.zeros((3, 3, 3)), ref, pred, spacing_mm=(1, 1, 1))


def test_choose_cases_ranks_by_dice_then_hd95_and_skips_empty_cases():
    rows = [
        {"case": "a", "class": 1, "dice": 0.9, "hd95": 1.0, "n_ref": 10, "n_pred": 10},
        {"case": "b", "class": 1, "dice": 0.2, "hd95": 5.0, "n_ref": 10, "n_pred": 10},
        {"case": "c", "class": 1, "dice": 0.2, "hd95": math.nan, "n_ref": 10, "n_pred": 0},  # worse: undefined HD95
        {"case": "d", "class": 1, "dice": 0.6, "hd95": 2.0, "n_ref": 10, "n_pred": 10},
        {"case": "e", "class": 1, "dice": 1.0, "hd95": 0.0, "n_ref": 0, "n_pred": 0},  # nothing to draw
        {"case": "a", "class": 2, "dice": 0.5, "hd95": 1.0, "n_ref": 3, "n_pred": 3},
    ]
    # class 1 ranked worst first: c, b, d, a -> median index (4 - 1) // 2 = 1 -> b
    assert [(r, row["case"]) for r, row in choose_cases(rows, 1)] == [("best", "a"), ("median", "b"), ("worst", "c")]
    assert [(r, row["case"]) for r, row in choose_cases(rows, 2)] == [("only", "a")]
    assert choose_cases(rows, 3) == []


# ---------------------------------------------------------------- progress.png


HISTORY = """epoch,loss,dice_organ,dice_lesion,dice_fg_mean,val_loss,val_dice_organ,val_dice_lesion,val_dice_fg_mean,learning_rate
1,0.9,0.2,0.1,0.15,0.95,0.3,0.1,0.2,0.01
2,0.7,0.4,0.2,0.3,0.8,0.5,0.3,0.4,0.009
3,0.6,0.5,0.3,0.4,0.7,0.7,0.5,0.6,0.008
"""  # noqa: E501 (a CSV header line)


def test_progress_figure_draws_every_epoch_of_the_file_and_marks_the_best(tmp_path):
    (tmp_path / "history.csv").write_text(HISTORY)
    (tmp_path / "epoch_times.csv").write_text("epoch,seconds\n1,12.5\n2,11.0\n3,11.2\n")
    history = read_history(tmp_path / "history.csv")
    assert best_epoch(history, "val_dice_fg_mean") == (3, 0.6)
    assert best_epoch(history, "val_loss") == (3, 0.7)
    fig = progress_figure(history, epoch_seconds=read_history(tmp_path / "epoch_times.csv"))
    try:
        ax_loss, ax_dice, ax_lr, ax_time = fig.axes
        labels = {line.get_label(): line for line in ax_dice.get_lines()}
        for name in ("organ (val)", "organ (train)", "lesion (val)", "foreground mean (val)"):
            assert list(labels[name].get_xdata()) == [1, 2, 3], name
        assert "best epoch 3: val_dice_fg_mean = 0.6" in labels
        assert [line.get_label() for line in ax_loss.get_lines()][:2] == ["training", "validation"]
        assert ax_lr.get_yscale() == "log" and list(ax_lr.get_lines()[0].get_ydata()) == [0.01, 0.009, 0.008]
        assert list(ax_time.get_lines()[0].get_ydata()) == [12.5, 11.0, 11.2]
        assert ax_lr.get_xlabel() == "epoch" and ax_time.get_ylabel() == "seconds per epoch (s)"
        assert ax_dice.get_ylabel() == "Dice (0-1)"
        # vertical marker of the best epoch on every panel
        for ax in (ax_loss, ax_dice, ax_lr):
            assert any(list(line.get_xdata()) == [3, 3] for line in ax.get_lines())
    finally:
        plt.close(fig)


def test_resumed_history_continues_the_same_picture(tmp_path):
    (tmp_path / "history.csv").write_text(HISTORY)
    out = write_progress_plot(tmp_path)
    assert out == tmp_path / "progress.png" and out.read_bytes().startswith(b"\x89PNG")
    # A resumed run appends epochs to the same file; the picture is redrawn from all of them.
    (tmp_path / "history.csv").write_text(HISTORY + "4,0.5,0.6,0.4,0.5,0.65,0.75,0.55,0.65,0.007\n")
    write_progress_plot(tmp_path)
    fig = progress_figure(read_history(tmp_path / "history.csv"))
    try:
        (line,) = [l for l in fig.axes[1].get_lines() if l.get_label() == "foreground mean (val)"]
        assert list(line.get_xdata()) == [1, 2, 3, 4]
    finally:
        plt.close(fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv", "progress.png"]  # no temp files left


def test_progress_plot_of_an_old_history_without_lr_or_times(tmp_path):
    (tmp_path / "history.csv").write_text("epoch,loss,val_loss,val_dice_a,val_dice_fg_mean\n"
                                          "1,1.0,1.1,,0.1\n2,0.8,nan,0.3,0.3\n")
    history = read_history(tmp_path / "history.csv")
    assert math.isnan(history["val_dice_a"][0]) and math.isnan(history["val_loss"][1])
    plot_progress(history, tmp_path / "p.png", monitor="val_loss")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert best_epoch(history, "val_loss") == (1, 1.1)  # NaN never wins
    assert best_epoch(history, "nope") is None


def test_read_history_names_file_line_and_column(tmp_path):
    (tmp_path / "h.csv").write_text("epoch,loss\n1,0.5\n2,oops\n")
    with pytest.raises(ValueError, match=r"h\.csv:3: Expected numbers\. Received: loss='oops'\.$"):
        read_history(tmp_path / "h.csv")
    with pytest.raises(FileNotFoundError, match=r"Received: path=.*missing\.csv \(no such file\)\.$"):
        read_history(tmp_path / "missing.csv")


# ---------------------------------------------------------------- HTML tables (parsed, no browser)


class _Cells(HTMLParser):
    """Text of every element that has a data-stat attribute, keyed by its and its parents' data-*."""

    def __init__(self):
        super().__init__()
        self.stack, self.cells, self.images = [], {}, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images += 1
        if tag in ("img", "br", "meta"):
            return
        self.stack.append((tag, attrs, []))

    def handle_endtag(self, tag):
        while self.stack:
            name, attrs, text = self.stack.pop()
            context = {}
            for _, a, _ in self.stack:
                context.update({k: v for k, v in a.items() if k.startswith("data-")})
            context.update({k: v for k, v in attrs.items() if k.startswith("data-")})
            if "data-stat" in attrs or ("data-metric" in attrs and name == "td"):
                key = tuple(sorted(context.items()))
                self.cells.setdefault(key, "".join(text).strip())
            if self.stack:
                self.stack[-1][2].append("".join(text))
            if name == tag:
                break

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2].append(data)


def test_summary_table_holds_the_summary_numbers():
    summary = {
        "n_cases": 2, "labels": [1], "class_names": {"1": "organ"},
        "per_class": {"1": {"name": "organ", "n_cases": 2, "missed": 1, "spurious": 0, "both_empty": 0,
                            "metrics": {"dice": {"mean": 0.61234, "std": 0.1, "median": 0.6, "n": 2},
                                        "hd95": {"mean": 3.456, "std": 1.0, "median": 3.0, "n": 1}},
                            "distances_worst_filled": {"hd95": {"mean": 40.5, "std": 2.0, "median": 40.5, "n": 2}}}},
        "foreground_mean": {"dice": 0.61234, "hd95": 3.456},
        "definitions": {"hd95": "x"},
    }
    text = evaluation_report_html(summary,
                                  [{"case": "a", "class": 1, "class_name": "organ", "dice": 0.5, "hd95": math.nan}])
    parser = _Cells()
    parser.feed(text)
    cells = parser.cells

    def cell(**data):
        matches = [v for k, v in cells.items() if all((f"data-{a}", str(b)) in k for a, b in data.items())]
        assert len(matches) == 1, (data, matches)
        return matches[0]

    assert cell(table="metrics", metric="dice", stat="mean") == "0.6123"
    assert cell(table="metrics", metric="hd95", stat="median") == "3.00"
    assert cell(table="worst", metric="hd95", stat="mean") == "40.50"
    assert cell(metric="missed") == "1"
    assert cell(case="a", metric="hd95") == "n/a"
    assert "<script" not in text and "http" not in text  # self-contained, nothing to fetch


def test_reports_do_not_import_tensorflow():
    code = ("import sys, segpipe.reports.html, segpipe.reports.progress, segpipe.reports.overlays; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_report_finds_scans_beside_the_label_folder_a_reference_links_to(phantom_root, tmp_path):
    """Run mode links the dataset's label maps into evaluation/references; the scans are found through the links."""
    from segpipe.evaluation.folders import evaluate_folders

    refs, preds = tmp_path / "references", tmp_path / "preds"
    refs.mkdir()
    preds.mkdir()
    for path in sorted((phantom_root / "labelsTr").glob("*.nii.gz"))[:3]:
        (refs / path.name).symlink_to(path)
        (preds / path.name).symlink_to(path)  # a perfect "prediction"
    evaluate_folders(preds, refs, tmp_path / "eval", workers=1)
    text = (tmp_path / "eval" / "report.html").read_text()
    assert f"Scans from {phantom_root / 'imagesTr'}" in text and "drawn on black" not in text
    assert len(list((tmp_path / "eval" / "overlays").glob("*.png"))) == 6  # best/median/worst x 2 classes

    (tmp_path / "eval2").mkdir()
    evaluate_folders(preds, refs, tmp_path / "eval2", workers=1, image_dir=tmp_path / "eval2")  # no scans there
    assert "drawn on black" in (tmp_path / "eval2" / "report.html").read_text()
