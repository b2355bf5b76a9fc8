"""The one recipe of a tiny training run: overrides that make any config a seconds-long run on the tiny
phantoms of ``conftest.phantom_root`` (used by the ``tiny_overrides`` fixture and by tests that need
their own variant: later overrides win)."""
from __future__ import annotations

from pathlib import Path


def tiny_run_overrides(phantom_root: Path, output_dir: Path | None, *changes: str) -> list[str]:
    """Dotted overrides of a tiny run on ``phantom_root`` into ``output_dir`` (None: not set), then ``changes``.

    Parameters
    ----------
    phantom_root : Path
        The tiny phantom dataset (MSD layout).
    output_dir : Path or None
        Where the runs go (``output_dir=``), or None to leave it to the caller.
    *changes : str
        More ``key=value`` overrides; a key given here wins over the recipe's (applied later).

    Examples
    --------
    >>> tiny_run_overrides(Path("ds"), None, "train.epochs=5")[-1]
    'train.epochs=5'
    """
    return [
        f"data.root={phantom_root}",
        "data.phantoms=null",
        "data.patch_size=[16, 16, 16]",
        "data.batch_size=2",
        "data.val_fraction=0.34",
        # 6 tiny cases: spawning worker processes costs more than it saves (the parallel paths have
        # their own tests: tests/data/test_cache.py, test_evaluation.py, and the distribution tests)
        "data.preprocess_workers=1",
        "model.depth=2",
        "model.base_filters=4",
        "train.epochs=2",
        "train.steps_per_epoch=3",
        # no bundle (SavedModel + segment signature + OpenVINO, each verified: most of a tiny run's
        # time); the export after training is tested by tests/test_train_e2e.py (tiny_run) and
        # planning/test_plan_e2e.py, the formats by tests/test_export.py. Add
        # "train.export_bundle=true" after these overrides to get one.
        "train.export_bundle=false",
        *([f"output_dir={output_dir}"] if output_dir is not None else []),
        *changes,
    ]
