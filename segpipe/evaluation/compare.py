"""Compare several trained runs on the same cases: tables, paired statistics, plots, a report.

Runs are grouped by configuration (a run named ``<config>_fold<k>`` belongs to ``<config>``), and
each group's per-case tables are pooled over its folds, so with k-fold training every case is
scored once, out of fold. Comparisons are paired by (case, class): runs must have been trained on
the same dataset with the same splits, or the comparison is refused.

Statistics, per class and metric, of every configuration against a reference configuration:
the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided; zero differences dropped, as
in Wilcoxon's original test; exact distribution for small samples), the number of cases where each
side is better, and Holm's step-down correction over all the comparisons of the report.
Distances (HD95, ASSD) of cases where one mask is empty are undefined (NaN); for the statistics
they count as the worst possible value, the case's image diagonal in mm, so missing a structure
is never rewarded.

Candidates are training runs and any other folder of evaluated predictions (a folder with
``evaluation/per_case.csv``, such as an ensemble's ``runs/<name>_ensemble/``); those are paired by
case id only (their cases must be the reference's). :func:`recommend` names the best candidate by
mean foreground Dice over the same cases, its margin over the runner-up with the paired test and a
bootstrap confidence interval, and the post-processing it uses (:func:`candidate_postprocessing`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from segpipe.errors import Received, expected
from segpipe.evaluation.paired_statistics import bootstrap_mean_ci, holm, paired_test
from segpipe.io import atomic_path, write_text
from segpipe.reports.evaluation_tables import COMPARISON_NOTE, comparison_markdown, comparison_tables, tests_table
from segpipe.reports.html import write_comparison_report
from segpipe.reports.recommendation import recommendation_html, recommendation_markdown
from segpipe.runs.rundir import RunDir
from segpipe.tables import read_csv, write_csv, write_json

METRICS = ("dice", "iou", "hd95", "assd", "nsd")
LOWER_IS_BETTER = {"hd95", "assd"}
DISTANCES = {"hd95", "assd"}
FOLD_SUFFIX = re.compile(r"_fold(\d+)$")
ENSEMBLE_SUFFIX = re.compile(r"_ensemble$")
RECOMMENDATION_FILE = "recommendation.json"


class ComparisonError(ValueError):
    """Runs that cannot be compared pairwise (different data or splits), or nothing to compare."""


@dataclass
class ConfigRuns:
    """The runs of one configuration (one per fold) and their pooled per-case rows."""

    name: str
    run_dirs: list[Path]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def values(self, metric: str, label: int) -> dict[str, float]:
        """case id -> value of ``metric`` for class ``label``; distances NaN -> image diagonal."""
        out = {}
        for row in self.rows:
            if row["class"] == label:
                value = row[metric]
                if metric in DISTANCES and math.isnan(value):
                    value = row["image_diagonal_mm"]
                out[row["case"]] = value
        return out


# ---------------------------------------------------------------- finding and checking runs


def is_evaluated_folder(path: Path) -> bool:
    """A candidate that is not a training run: a folder with ``evaluation/per_case.csv`` (predictions
    scored by ``evaluate.py --pred``, an ensemble's ``<name>_ensemble/``) and no config.yaml, or any
    ``*_ensemble`` folder. It is paired with the others by case id only."""
    path = Path(path)
    evaluated = (RunDir(path).evaluation_dir / "per_case.csv").is_file()
    return evaluated and (not RunDir(path).is_run() or ENSEMBLE_SUFFIX.search(path.name) is not None)


def _is_candidate(path: Path) -> bool:
    return RunDir(path).is_run() or is_evaluated_folder(path)


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Candidate folders among ``paths``: each path is a run (has config.yaml), a folder of evaluated
    predictions (:func:`is_evaluated_folder`), or an experiment folder of those."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if _is_candidate(path):
            runs.append(path)
        elif path.is_dir():
            runs += sorted(p for p in path.iterdir() if p.is_dir() and _is_candidate(p))
        else:
            raise ComparisonError(expected(
                "a run folder, a folder with evaluation/per_case.csv or an experiment folder of those",
                key="--compare", received=Received(f"{path} (not found)")))
    if not runs:
        raise ComparisonError(expected("run folders (with config.yaml) or folders with evaluation/per_case.csv",
                                       key="--compare", received=Received(f"{[str(p) for p in paths]} (none found)")))
    return runs


def group_runs(run_dirs: Sequence[Path]) -> list[ConfigRuns]:
    """Group run folders by configuration name, in order of first appearance."""
    groups: dict[str, ConfigRuns] = {}
    for run_dir in run_dirs:
        name = FOLD_SUFFIX.sub("", run_dir.name)
        groups.setdefault(name, ConfigRuns(name, [])).run_dirs.append(run_dir)
    return list(groups.values())


def _run_identity(run_dir: Path) -> tuple[str, int | None, str]:
    """(dataset root, fold, split as canonical JSON) of a run, for the pairing check."""
    run = RunDir(run_dir)
    data = run.config_dict().get("data", {})
    saved = run.split()
    if saved is None:
        raise ComparisonError(expected("a trained run (with splits.json)", key="--compare",
                                       received=Received(f"{run_dir} (no splits.json)")))
    # the case ids only: the same split may be named differently (seeded, or from data.split_file)
    split = {part: sorted(saved.get(part, [])) for part in ("train", "val")}
    return str(Path(data.get("root", "")).resolve()), data.get("fold"), json.dumps(split, sort_keys=True)


def check_comparable(groups: Sequence[ConfigRuns]) -> None:
    """Refuse runs that did not see the same dataset and the same splits, naming the offenders.

    Evaluated folders (:func:`is_evaluated_folder`) have no split to check: :func:`compare` pairs
    them by case id and refuses different cases."""
    groups = [g for g in groups if not any(is_evaluated_folder(d) for d in g.run_dirs)]
    if len(groups) < 2:
        return
    reference = groups[0]
    ref_ids = {}
    for run_dir in reference.run_dirs:
        root, fold, split = _run_identity(run_dir)
        ref_ids[fold] = (root, split, run_dir)
    problems = []
    for group in groups[1:]:
        folds_seen = set()
        for run_dir in group.run_dirs:
            root, fold, split = _run_identity(run_dir)
            folds_seen.add(fold)
            if fold not in ref_ids:
                problems.append(f"{run_dir} is fold {fold}, which {reference.name} does not have")
                continue
            ref_root, ref_split, ref_dir = ref_ids[fold]
            if root != ref_root:
                problems.append(f"{run_dir} used dataset {root}, {ref_dir} used {ref_root}")
            elif split != ref_split:
                problems.append(f"{run_dir} and {ref_dir} have different splits (splits.json)")
        if folds_seen != set(ref_ids):
            problems.append(f"{group.name} has folds {sorted(map(str, folds_seen))}, {reference.name} has "
                            f"{sorted(map(str, ref_ids))}")
    if problems:
        raise ComparisonError(expected("runs that use the same dataset and the same splits, to compare them pairwise",
                                       key="--compare", received=Received(f"{len(problems)} mismatch(es)"))
                              + "\n  " + "\n  ".join(problems))


def load_per_case(path: Path) -> list[dict[str, Any]]:
    """Rows of an evaluation's per_case.csv (:func:`segpipe.tables.read_csv`: NaN kept); metrics as float."""
    rows = read_csv(path, text=("case", "class_name"))
    for row in rows:
        for key in (*METRICS, "image_diagonal_mm"):
            row[key] = float(row[key])
    return rows


# ---------------------------------------------------------------- the comparison


def compare(groups: Sequence[ConfigRuns], labels: Sequence[int], class_names: dict[int, str]) -> dict[str, Any]:
    """Summary per class/metric/config and paired tests of every config against the first."""
    summary = []
    for label in labels:
        for metric in METRICS:
            for group in groups:
                values = np.array(list(group.values(metric, label).values()), dtype=np.float64)
                raw = np.array([r[metric] for r in group.rows if r["class"] == label], dtype=np.float64)
                summary.append({
                    "class": label, "class_name": class_names.get(label, str(label)), "metric": metric,
                    "config": group.name, "n": int(values.size),
                    "mean": float(np.mean(values)) if values.size else float("nan"),
                    "std": float(np.std(values)) if values.size else float("nan"),
                    "median": float(np.median(values)) if values.size else float("nan"),
                    "undefined": int(np.isnan(raw).sum()),  # distances counted at the worst value
                })
    tests = []
    reference = groups[0]
    for group in groups[1:]:
        for label in labels:
            for metric in METRICS:
                ref_values, values = reference.values(metric, label), group.values(metric, label)
                cases = sorted(set(ref_values) & set(values))
                if set(ref_values) != set(values):
                    raise ComparisonError(expected(
                        f"the cases {reference.name} scored for class {label}", key=f"{group.name}.cases",
                        received=Received(f"only in {reference.name}: {sorted(set(ref_values) - set(values))}, "
                                          f"only in {group.name}: {sorted(set(values) - set(ref_values))}")))
                result = paired_test([ref_values[c] for c in cases], [values[c] for c in cases],
                                     lower_is_better=metric in LOWER_IS_BETTER)
                tests.append({"config": group.name, "reference": reference.name, "class": label,
                              "class_name": class_names.get(label, str(label)), "metric": metric, **result})
    for test, p_holm in zip(tests, holm([t["p"] for t in tests]) if tests else []):
        test["p_holm"] = p_holm
    return {"reference": reference.name, "configs": [g.name for g in groups], "summary": summary, "tests": tests}


# ---------------------------------------------------------------- the recommendation


def foreground_dice(group: ConfigRuns, labels: Sequence[int]) -> dict[str, float]:
    """case id -> mean Dice over ``labels`` of one candidate (cases scored for every label only)."""
    per_label = [group.values("dice", label) for label in labels]
    cases = set.intersection(*(set(v) for v in per_label)) if per_label else set()
    return {case: float(np.mean([v[case] for v in per_label])) for case in sorted(cases)}


def candidate_postprocessing(run_dirs: Sequence[Path]) -> dict[str, Any]:
    """The post-processing a candidate's evaluated predictions used, from the first file that says.

    Looked up in the candidate's (first) folder, in this order:

    1. ``evaluation/summary.json``, key ``postprocessing`` (a decision record of
       :func:`segpipe.evaluation.postprocessing.choose_postprocessing`: chosen on data);
    2. ``bundle/bundle.json``, key ``postprocessing`` (the same record);
    3. ``config.yaml``, ``inference.postprocess_largest_component`` (a run: what ``evaluate.py RUN``
       applied; fixed by hand, not chosen on data);
    4. ``bundle/bundle.json``, ``inference.postprocess_largest_component``.

    Parameters
    ----------
    run_dirs : sequence of Path
        The candidate's folders (folds of one configuration share their config; the first is read).

    Returns
    -------
    dict
        ``postprocess_largest_component`` (list of labels, or None when unknown),
        ``postprocess_largest_foreground`` (bool, or None), ``chosen_on_data`` (bool) and ``source``
        (``"<file>#<key>"``, or None when no file says).
    """
    import yaml

    folder = Path(run_dirs[0])
    run = RunDir(folder)

    def record(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    for path in (run.evaluation_dir / "summary.json", run.bundle_dir / "bundle.json"):
        chosen = (record(path) or {}).get("postprocessing")
        if isinstance(chosen, dict) and "postprocess_largest_component" in chosen:
            return {"postprocess_largest_component": [int(c) for c in chosen["postprocess_largest_component"]],
                    "postprocess_largest_foreground": bool(chosen.get("postprocess_largest_foreground", False)),
                    "chosen_on_data": True, "source": f"{path}#postprocessing"}
    fixed = None
    if run.is_run():
        try:
            config = yaml.safe_load(run.config_yaml.read_text()) or {}
        except (OSError, yaml.YAMLError):
            config = {}
        fixed = ((config.get("inference") or {}).get("postprocess_largest_component"),
                 f"{run.config_yaml}#inference.postprocess_largest_component")
    if fixed is None or fixed[0] is None:
        bundle = record(run.bundle_dir / "bundle.json") or {}
        value = (bundle.get("inference") or {}).get("postprocess_largest_component")
        fixed = ((value, f"{run.bundle_dir / 'bundle.json'}#inference.postprocess_largest_component")
                 if value is not None else fixed)
    if fixed is None:
        return {"postprocess_largest_component": None, "postprocess_largest_foreground": None,
                "chosen_on_data": False, "source": None}
    value, source = fixed
    return {"postprocess_largest_component": [int(c) for c in value or []], "postprocess_largest_foreground": False,
            "chosen_on_data": False, "source": source}


def recommend(groups: Sequence[ConfigRuns], labels: Sequence[int], *, alpha: float = 0.05,
              confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> dict[str, Any]:
    """The best candidate by mean foreground Dice on the same cases, and how sure that is.

    Per case, the foreground Dice is the mean Dice over ``labels``; candidates are ranked by its mean
    over the cases. The margin of the best over the runner-up is tested with the paired Wilcoxon
    signed-rank test (:func:`paired_test`) and given a bootstrap confidence interval of the mean
    per-case difference (:func:`bootstrap_mean_ci`). ``decisive`` is ``p < alpha``. The test is
    chosen after ranking (the top two of several), so with many candidates read it as a screen,
    not a confirmation.

    Parameters
    ----------
    groups : sequence of ConfigRuns
        The candidates with their per-case rows (at least two).
    labels : sequence of int
        The foreground labels.
    alpha : float, optional
        Level for ``decisive``. Defaults to 0.05.
    confidence, n_resamples, seed
        Of the bootstrap interval (defaults 0.95, 9999, 0).

    Returns
    -------
    dict
        ``best``, ``runner_up`` (names), ``n_cases``, ``ranking`` (``[{"config",
        "mean_foreground_dice", "postprocessing"}]``, best first), ``margin`` (best minus runner-up
        mean foreground Dice), ``test`` (:func:`paired_test` of the best against the runner-up:
        ``wins`` = cases where the best is better), ``ci`` (:func:`bootstrap_mean_ci`), ``alpha``,
        ``decisive``, ``tie`` (equal means: the first in the report's order is named best),
        ``postprocessing`` (the best's, :func:`candidate_postprocessing`) and ``summary`` (one
        sentence).

    Raises
    ------
    ComparisonError
        Fewer than two candidates, or candidates scored on different cases (naming them).
    """
    if len(groups) < 2:
        raise ComparisonError(expected("at least two candidates to recommend from", key="--compare",
                                       received=Received(f"{[g.name for g in groups]}")))
    values = {g.name: foreground_dice(g, labels) for g in groups}
    first = groups[0].name
    for name, per_case in values.items():
        if set(per_case) != set(values[first]):
            raise ComparisonError(expected(
                f"the cases {first} scored for every class", key=f"{name}.cases",
                received=Received(f"only in {first}: {sorted(set(values[first]) - set(per_case))[:10]}, "
                                  f"only in {name}: {sorted(set(per_case) - set(values[first]))[:10]}")))
    cases = sorted(values[first])
    means = {name: float(np.mean([v[c] for c in cases])) if cases else math.nan for name, v in values.items()}
    order = sorted(range(len(groups)), key=lambda i: -means[groups[i].name])  # stable: report order on ties
    ranked = [groups[i] for i in order]
    best, runner_up = ranked[0].name, ranked[1].name
    a = np.array([values[runner_up][c] for c in cases])
    b = np.array([values[best][c] for c in cases])
    test = paired_test(a, b)
    ci = bootstrap_mean_ci(b - a, confidence=confidence, n_resamples=n_resamples, seed=seed)
    margin = means[best] - means[runner_up]
    decisive = bool(test["p"] < alpha)
    post = {g.name: candidate_postprocessing(g.run_dirs) for g in groups}
    summary = (f"{best} has the highest mean foreground Dice ({means[best]:.4f} over {len(cases)} cases), "
               f"{margin:+.4f} over {runner_up} ({100 * confidence:g}% CI [{ci['low']:+.4f}, {ci['high']:+.4f}], "
               f"Wilcoxon p = {test['p']:.4g}, better in {test['wins']} cases, worse in {test['losses']}): "
               + ("the difference is unlikely to be noise." if decisive else
                  f"not distinguishable from {runner_up} on these cases (p >= {alpha:g})."))
    return {
        "criterion": "mean over cases of the per-case mean Dice over the foreground classes",
        "best": best, "runner_up": runner_up, "n_cases": len(cases),
        "ranking": [{"config": g.name, "mean_foreground_dice": means[g.name], "postprocessing": post[g.name]}
                    for g in ranked],
        "margin": margin, "test": test, "ci": ci, "alpha": float(alpha), "decisive": decisive,
        "tie": bool(margin == 0), "postprocessing": post[best], "summary": summary,
    }


# ---------------------------------------------------------------- plots


def plot_boxes(groups: Sequence[ConfigRuns], labels: Sequence[int], class_names: dict[int, str], metric: str,
               path: Path) -> None:
    """Box plots of ``metric`` per class (one panel each) and configuration (one box each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(labels), figsize=(1.2 + 1.4 * len(groups) * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        data = [list(g.values(metric, label).values()) for g in groups]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(groups) + 1), [g.name for g in groups], rotation=30, ha="right")
        ax.set_title(class_names.get(label, str(label)))
        ax.set_ylabel(f"{metric} (mm)" if metric in DISTANCES else metric)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_training_curves(groups: Sequence[ConfigRuns], class_names: dict[int, str], labels: Sequence[int],
                         path: Path) -> None:
    """Training loss, validation loss and validation Dice per class of every run, on shared axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["loss", "val_loss"] + [f"val_dice_{class_names.get(v, v)}" for v in labels]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, group in enumerate(groups):
        for j, run_dir in enumerate(group.run_dirs):
            history = RunDir(run_dir).history()
            for ax, key in zip(axes[0], panels):
                if history and key in history[0]:
                    ax.plot([float(r["epoch"]) for r in history], [float(r[key]) for r in history],
                            color=colors[i % len(colors)], alpha=0.9, label=group.name if j == 0 else None)
    for ax, key in zip(axes[0], panels):
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # folders without history.csv draw no curve
        axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the whole report


def write_comparison(groups: Sequence[ConfigRuns], out_dir: Path, class_names: dict[int, str]) -> dict[str, Any]:
    """Write report.md, report.html (the same tables, plots embedded), comparison.csv, comparison.json,
    recommendation.json (:func:`recommend`, also under ``comparison.json["recommendation"]``) and the
    PNG plots into ``out_dir``."""
    labels = sorted({r["class"] for g in groups for r in g.rows})
    result = compare(groups, labels, class_names)
    result["recommendation"] = recommend(groups, labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RECOMMENDATION_FILE, result["recommendation"])  # NaN as null (segpipe.tables)
    plot_boxes(groups, labels, class_names, "dice", out_dir / "boxplot_dice.png")
    plot_boxes(groups, labels, class_names, "hd95", out_dir / "boxplot_hd95.png")
    plot_training_curves(groups, class_names, labels, out_dir / "training_curves.png")

    columns = ["config", "run", "case", "class", "class_name", *METRICS, "image_diagonal_mm"]
    rows = ({**row, "config": group.name} for group in groups for row in group.rows)
    write_csv(out_dir / "comparison.csv", rows, columns)
    write_json(out_dir / "comparison.json", result)

    # the tables are computed once and shown twice: report.md (and the terminal), report.html
    class_tables = comparison_tables(result, metrics=METRICS, lower_is_better=LOWER_IS_BETTER)
    tests = tests_table(result)
    tables = comparison_markdown(class_tables, tests)
    runs = "\n".join(f"- `{g.name}`: " + ", ".join(f"`{d}`" for d in g.run_dirs) for g in groups)
    report = (
        "# Comparison\n\n"
        f"Configurations (reference first):\n{runs}\n\n"
        f"{recommendation_markdown(result['recommendation'])}\n"
        f"{COMPARISON_NOTE}\n\n"
        f"{tables}\n"
        "## Plots\n\n![Dice](boxplot_dice.png)\n\n![HD95](boxplot_hd95.png)\n\n"
        "![Training curves](training_curves.png)\n"
    )
    write_text(out_dir / "report.md", report)
    write_comparison_report(out_dir, class_tables, tests=tests, reference=result["reference"],
                            runs={g.name: [str(d) for d in g.run_dirs] for g in groups},
                            extra_html=recommendation_html(result["recommendation"]))
    result["markdown"] = recommendation_markdown(result["recommendation"]) + "\n" + tables
    return result
