"""The recommendation of a comparison (:func:`segpipe.evaluation.compare.recommend`) as Markdown and HTML.

Both show the same things: the one-sentence summary, the ranking by mean foreground Dice with each
candidate's post-processing, and the paired test and bootstrap interval of the margin.
"""
from __future__ import annotations

import math
from html import escape
from typing import Any, Mapping

__all__ = ["describe_postprocessing", "recommendation_html", "recommendation_markdown"]


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
    lines = ["## Recommendation", "", f"**{rec['best']}**. {rec['summary']}", "",
             "| rank | config | mean foreground Dice | post-processing |", "|---|---|---|---|"]
    for i, row in enumerate(rec["ranking"], 1):
        lines.append(f"| {i} | {row['config']} | {_number(row['mean_foreground_dice'])} | "
                     f"{describe_postprocessing(row['postprocessing'])} |")
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
    rows = "".join(
        f'<tr data-config="{escape(row["config"])}"><td>{i}</td><td class="text">{escape(row["config"])}</td>'
        f'<td data-stat="mean_foreground_dice">{_number(row["mean_foreground_dice"])}</td>'
        f'<td class="text">{escape(describe_postprocessing(row["postprocessing"]))}</td></tr>'
        for i, row in enumerate(rec["ranking"], 1))
    return (
        '<section id="recommendation"><h2>Recommendation</h2>'
        f'<p><strong data-best="{escape(rec["best"])}">{escape(rec["best"])}</strong>. {escape(rec["summary"])}</p>'
        '<table id="ranking"><thead><tr><th>rank</th><th class="text">config</th><th>mean foreground Dice</th>'
        f'<th class="text">post-processing</th></tr></thead><tbody>{rows}</tbody></table>'
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


def _number(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"
