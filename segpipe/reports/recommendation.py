"""The recommendation of a comparison (:func:`segpipe.evaluation.compare.recommend`) as Markdown and HTML.

Both show the same things: the one-sentence summary, the ranking by mean foreground Dice with each
candidate's post-processing (one :class:`~segpipe.reports.tables.Table`, rendered by
:mod:`segpipe.reports.tables`), and the paired test and bootstrap interval of the margin.
"""
from __future__ import annotations

from typing import Any, Mapping

from segpipe.reports.tables import Cell, Column, Row, Table, escape, to_html, to_markdown

__all__ = ["describe_postprocessing", "ranking_table", "recommendation_html", "recommendation_markdown"]


def describe_postprocessing(post: Mapping[str, Any]) -> str:
    """One phrase for a candidate's post-processing (:func:`segpipe.evaluation.compare.candidate_postprocessing`).

    Parameters
    ----------
    post : dict
        ``postprocess_largest_component``, ``postprocess_largest_foreground``, ``chosen_on_data``, ``source``.

    Returns
    -------
    str
        For example ``"largest component of classes [1] (chosen on data)"``.

    Examples
    --------
    >>> describe_postprocessing({"postprocess_largest_component": [], "postprocess_largest_foreground": False,
    ...                          "chosen_on_data": False, "source": "runs/a/config.yaml#inference"})
    'none (set in the config)'
    >>> describe_postprocessing({"postprocess_largest_component": None, "source": None})
    'unknown (no evaluation/summary.json, bundle.json or config.yaml says)'
    """
    classes = post.get("postprocess_largest_component")
    if classes is None:
        return "unknown (no evaluation/summary.json, bundle.json or config.yaml says)"
    steps = []
    if post.get("postprocess_largest_foreground"):
        steps.append("largest component of all foreground")
    if classes:
        steps.append(f"largest component of classes {list(classes)}")
    how = "chosen on data" if post.get("chosen_on_data") else "set in the config"
    return f"{', then '.join(steps) if steps else 'none'} ({how})"


def ranking_table(rec: Mapping[str, Any]) -> Table:
    """The ranking of a recommendation as a :class:`~segpipe.reports.tables.Table` (``id="ranking"`` in HTML).

    Parameters
    ----------
    rec : dict
        :func:`segpipe.evaluation.compare.recommend`'s result.

    Returns
    -------
    Table
        One row per candidate, best first: rank, config (``data-config``), mean foreground Dice
        (``data-stat="mean_foreground_dice"``), post-processing (:func:`describe_postprocessing`).
    """
    columns = [Column("rank"), Column("config", text=True), Column("mean foreground Dice"),
               Column("post-processing", text=True)]
    rows = [Row([Cell(i, spec=".0f"), Cell(row["config"]),
                 Cell(row["mean_foreground_dice"], data={"stat": "mean_foreground_dice"}),
                 Cell(describe_postprocessing(row["postprocessing"]))], data={"config": row["config"]})
            for i, row in enumerate(rec["ranking"], 1)]
    return Table(columns, rows, html_id="ranking")


def recommendation_markdown(rec: Mapping[str, Any]) -> str:
    """The recommendation section of ``report.md`` (and of the terminal output).

    Parameters
    ----------
    rec : dict
        :func:`segpipe.evaluation.compare.recommend`'s result.

    Returns
    -------
    str
        Markdown, ending with a blank line.
    """
    test, ci = rec["test"], rec["ci"]
    lines = ["## Recommendation", "", f"**{rec['best']}**. {rec['summary']}", "", to_markdown(ranking_table(rec))]
    lines += ["", f"Margin over `{rec['runner_up']}`: {rec['margin']:+.4f} mean foreground Dice over "
              f"{rec['n_cases']} cases; {_ci_text(ci)}; Wilcoxon signed-rank (two-sided, paired by case) "
              f"p = {test['p']:.4g}, {test['wins']} cases better, {test['losses']} worse, {test['ties']} equal. "
              f"Machine-readable: `recommendation.json`.", ""]
    return "\n".join(lines)


def recommendation_html(rec: Mapping[str, Any]) -> str:
    """The recommendation section of the comparison's ``report.html`` (``id="recommendation"``).

    Parameters
    ----------
    rec : dict
        :func:`segpipe.evaluation.compare.recommend`'s result.

    Returns
    -------
    str
        An HTML fragment.
    """
    test, ci = rec["test"], rec["ci"]
    return (
        '<section id="recommendation"><h2>Recommendation</h2>'
        f'<p><strong data-best="{escape(rec["best"])}">{escape(rec["best"])}</strong>. {escape(rec["summary"])}</p>'
        f"{to_html(ranking_table(rec))}"
        f'<p class="note">Margin over <code>{escape(rec["runner_up"])}</code>: '
        f'<span data-stat="margin">{rec["margin"]:+.4f}</span> over {rec["n_cases"]} cases; {escape(_ci_text(ci))}; '
        f'Wilcoxon signed-rank p = <span data-stat="p">{test["p"]:.4g}</span>, {test["wins"]} cases better, '
        f'{test["losses"]} worse, {test["ties"]} equal. Machine-readable: <code>recommendation.json</code>.</p>'
        "</section>"
    )


def _ci_text(ci: Mapping[str, Any]) -> str:
    if ci["method"] == "none":
        return "no bootstrap interval (fewer than 2 cases)"
    return (f"{100 * ci['confidence']:g}% bootstrap CI [{ci['low']:+.4f}, {ci['high']:+.4f}] "
            f"({ci['method']}, {ci['n_resamples']} resamples, seed {ci['seed']})")
