"""The one table module (segpipe.tables) and the one table model (segpipe.reports.tables)."""
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest

from segpipe.reports.evaluation_tables import comparison_markdown, comparison_tables, summary_table
from segpipe.reports.tables import Cell, Column, Row, Stat, Table, to_html, to_markdown
from segpipe.tables import format_csv, read_columns, read_csv, read_json, write_csv, write_json

NAN = float("nan")


# ---------------------------------------------------------------- CSV and JSON rows


def test_csv_nan_round_trip_and_the_bytes_written(tmp_path):
    rows = [{"case": "001", "class": 1, "dice": NAN, "hd95": 0.1 + 0.2, "empty": True},
            {"case": "002", "class": 2, "dice": np.float64(0.5), "hd95": float("inf")}]
    write_csv(tmp_path / "t.csv", rows)
    # NaN as "nan", floats in repr form, a missing value as an empty cell, bools and ints as str
    assert (tmp_path / "t.csv").read_text() == ("case,class,dice,hd95,empty\n001,1,nan,0.30000000000000004,True\n"
                                                "002,2,0.5,inf,\n")
    back = read_csv(tmp_path / "t.csv", text=["case"])
    assert back[0]["case"] == "001" and back[0]["class"] == 1 and isinstance(back[0]["class"], int)
    assert math.isnan(back[0]["dice"]) and back[0]["hd95"] == 0.1 + 0.2 and back[0]["empty"] == "True"
    assert back[1]["hd95"] == math.inf and math.isnan(back[1]["empty"])  # the empty cell is NaN
    # written again, the same bytes (the comparison re-writes per_case rows it read)
    assert format_csv(back, ["case", "class", "dice", "hd95"]) == format_csv(rows, ["case", "class", "dice", "hd95"])


@pytest.mark.parametrize("cell", ["nan", "NaN", "NAN", "", " "])
def test_every_nan_spelling_reads_as_nan(tmp_path, cell):
    (tmp_path / "t.csv").write_text(f"epoch,loss\n1,{cell}\n")
    assert math.isnan(read_csv(tmp_path / "t.csv")[0]["loss"])
    assert math.isnan(read_columns(tmp_path / "t.csv")["loss"][0])


def test_history_format_is_the_one_runs_always_had(tmp_path):
    """history.csv: six significant digits, NaN as nan, a column a row lacks left empty."""
    from segpipe.training.checkpoints import write_history_csv

    rows = [{"epoch": 1, "loss": 0.123456789, "val_dice": NAN}, {"epoch": 2, "loss": 1e-7, "learning_rate": 0.01}]
    path = tmp_path / "history.csv"
    assert write_history_csv(path, rows) is True
    assert path.read_text() == "epoch,loss,val_dice,learning_rate\n1,0.123457,nan,\n2,1e-07,,0.01\n"
    assert write_history_csv(path, rows) is False  # already right: not rewritten
    columns = read_columns(path)
    assert columns["epoch"].tolist() == [1.0, 2.0] and math.isnan(columns["val_dice"][0])
    assert math.isnan(columns["learning_rate"][0]) and columns["learning_rate"][1] == 0.01


def test_strict_reading_names_the_file_line_and_column(tmp_path):
    (tmp_path / "t.csv").write_text("epoch,loss\n1,0.5\n2,oops\n")
    assert read_csv(tmp_path / "t.csv")[1]["loss"] == "oops"  # not strict: text kept
    with pytest.raises(ValueError, match=r"t\.csv:3: Expected numbers\. Received: loss='oops'\.$"):
        read_columns(tmp_path / "t.csv")
    with pytest.raises(FileNotFoundError, match=r"Received: path=.*missing\.csv \(no such file\)\.$"):
        read_csv(tmp_path / "missing.csv")


def test_json_nan_round_trip(tmp_path):
    data = {"mean": NAN, "rows": [{"p": float("inf"), "n": np.int64(3)}, {"p": 0.25}], "name": "x"}
    write_json(tmp_path / "t.json", data)
    on_disk = json.loads((tmp_path / "t.json").read_text())  # strict JSON: no NaN literal
    assert on_disk == {"mean": None, "rows": [{"p": None, "n": 3}, {"p": 0.25}], "name": "x"}
    back = read_json(tmp_path / "t.json")
    assert math.isnan(back["mean"]) and math.isnan(back["rows"][0]["p"])
    assert back["rows"][0]["n"] == 3 and back["rows"][1]["p"] == 0.25 and back["name"] == "x"


# ---------------------------------------------------------------- one model, two renderings


class _Cells(HTMLParser):
    """(data-* of the cell, text) of every <td>, and the text of <span data-stat> inside it."""

    def __init__(self):
        super().__init__()
        self.cells, self._open = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td":
            self._open = (attrs, [])
        elif tag == "span" and self._open is not None:
            self._open[1].append(f"<{attrs['data-stat']}>")

    def handle_endtag(self, tag):
        if tag == "td":
            self.cells.append((self._open[0], "".join(self._open[1])))
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open[1].append(data)


def _table() -> Table:
    return Table([Column("config", text=True), Column("dice", "mean ± std (median)"), Column("hd95"), Column("n")],
                 [Row([Cell("a|b"), Cell(Stat(0.5, 0.1, 0.52, 2, of=3), ".4f", {"metric": "dice"}, best=True),
                       Cell(NAN, ".2f", {"metric": "hd95"}), Cell(3, ".0f", {"metric": "n"})], {"config": "a"}),
                  Row([Cell("fg", strong=True), Cell(Stat(NAN, NAN, NAN, 0)), Cell(4.256, ".2f", {"metric": "hd95"}),
                       Cell("")], css_class="fg")],
                 title="class 1 (organ)", notes=["one note"], html_id="t", data={"class": 1})


def test_one_table_rendered_as_markdown():
    assert to_markdown(_table()) == (
        "### class 1 (organ)\n\n"
        "| config | dice | hd95 | n |\n"
        "|---|---|---|---|\n"
        "| a\\|b | **0.5000 ± 0.1000 (0.5200) (2/3)** | n/a | 3 |\n"
        "| **fg** | n/a | 4.26 |  |\n\n"
        "one note")


def test_one_table_rendered_as_html_shows_the_same_numbers():
    text = to_html(_table())
    assert text.startswith('<h2>class 1 (organ)</h2>\n<table id="t" data-class="1"><thead><tr>'
                           "<th class='text'>config</th><th>dice<br><small>mean ± std (median)</small></th>")
    assert '<tr class="fg">' in text and '<p class="note">one note</p>' in text
    parser = _Cells()
    parser.feed(text)
    (first, a), (best, dice), (_, hd95), (_, n), (_, fg), (_, empty_stat), (_, hd95_fg), (_, blank) = parser.cells
    assert (a, dice, hd95, n) == ("a|b", "<mean>0.5000 ± <std>0.1000 (<median>0.5200) (2/3)", "n/a", "3")
    assert first["class"] == "text" and best == {"class": "best", "data-metric": "dice"}
    assert (fg, empty_stat, hd95_fg, blank) == ("fg", "n/a", "4.26", "")
    assert "<b>fg</b>" in text


def test_a_row_must_have_a_cell_per_column():
    with pytest.raises(ValueError,
                       match=r"Expected 2 cells per row \(one per column\)\. Received: rows\[0\]=1 cells\."):
        Table([Column("a"), Column("b")], [Row([Cell(1)])])


def test_comparison_tables_compute_means_and_best_once_with_one_nan_rule():
    """The foreground mean leaves undefined class means out; NaN is never the best; ties are all best."""
    summary = [{"config": c, "class": label, "class_name": f"c{label}", "metric": m, "n": 2,
                "mean": mean, "std": 0.0, "median": mean}
               for c, label, m, mean in [("a", 1, "dice", 0.6), ("a", 2, "dice", NAN), ("b", 1, "dice", 0.5),
                                         ("b", 2, "dice", 0.7), ("a", 1, "hd95", 3.0), ("a", 2, "hd95", 5.0),
                                         ("b", 1, "hd95", 3.0), ("b", 2, "hd95", NAN)]]
    tables = comparison_tables({"configs": ["a", "b"], "summary": summary}, metrics=["dice", "hd95"],
                               lower_is_better=["hd95"])
    assert [t.title for t in tables] == ["class 1 (c1)", "class 2 (c2)", "foreground mean"]
    fg = {row.cells[0].value: row.cells[1:] for row in tables[2].rows}
    assert fg["a"][0].value == pytest.approx(0.6) and fg["b"][0].value == pytest.approx(0.6)  # 0.6 and (0.5+0.7)/2
    assert fg["a"][0].best and fg["b"][0].best  # a tie: both bold
    assert fg["a"][1].value == pytest.approx(4.0) and fg["b"][1].value == pytest.approx(3.0)
    assert fg["b"][1].best and not fg["a"][1].best
    class2 = {row.cells[0].value: row.cells[1] for row in tables[1].rows}
    assert class2["b"].best and not class2["a"].best  # the NaN mean of a is not the best Dice
    markdown = comparison_markdown(tables, None)
    assert "| a | **0.6000** | 4.00 |" in markdown and "| b | **0.6000** | **3.00** |" in markdown
    html = "".join(to_html(t) for t in tables)
    assert html.count('class="best"') == markdown.count("**") // 2  # the same cells are marked in both


def test_summary_table_markdown_and_html_show_the_same_values():
    summary = {
        "n_cases": 3, "tolerance_mm": {"1": 1.0},
        "per_class": {"1": {"name": "organ", "n_cases": 3, "missed": 1, "spurious": 0,
                            "metrics": {"dice": {"mean": 0.61234, "std": 0.1, "median": 0.6, "n": 3},
                                        "hd95": {"mean": 3.456, "std": 1.0, "median": 3.0, "n": 2}},
                            "distances_worst_filled": {"hd95": {"mean": 40.5, "std": 2.0, "median": 40.5, "n": 3}}}},
        "foreground_mean": {"dice": 0.61234, "hd95": 3.456, "hd95_worst_filled": 40.5},
    }
    table = summary_table(summary)
    markdown = to_markdown(table)
    assert markdown.startswith("| class | name | dice | iou | hd95 (mm) |")
    assert ("| 1 | organ | 0.6123 ± 0.1000 (0.6000) | n/a | 3.46 ± 1.00 (3.00) (2/3) | 40.50 ± 2.00 (40.50) |"
            in markdown)
    parser = _Cells()
    parser.feed(to_html(table))
    shown = {(a.get("data-class"), a.get("data-metric"), a.get("data-table")): text for a, text in parser.cells}
    assert shown["1", "dice", "metrics"] == "<mean>0.6123 ± <std>0.1000 (<median>0.6000)"
    assert shown["1", "hd95", "metrics"] == "<mean>3.46 ± <std>1.00 (<median>3.00) (2/3)"
    assert shown["fg", "hd95_worst_filled", None] == "40.50"
    assert "| fg | **foreground mean** | 0.6123 | n/a | 3.46 | 40.50 |" in markdown
