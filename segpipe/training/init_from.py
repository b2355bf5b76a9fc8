"""``train.init_from``: the weights a run starts from (a bundle, a run directory or a ``.keras`` file).

:func:`source_weights` reads them without running received code where the source may come from
someone else: a bundle is read like ``predict.py`` reads it (manifest, bounds, the network rebuilt by
segpipe's builders, only weight arrays read); a run directory's or a ``.keras`` file's model loads
with Keras safe mode. :func:`initialise_from` then copies them into the network to train
(:func:`segpipe.models.transfer.transfer_weights`) and returns the record that ``run_info.json``
keeps: the source, and which variables were loaded, adapted and new.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.errors import Received, expected, first_line
from segpipe.inference.bundle import BundleError, read_bundle
from segpipe.inference.runtimes import load_keras_network
from segpipe.models.architecture import ENSEMBLE
from segpipe.models.transfer import transfer_weights, variable_arrays
from segpipe.runs.rundir import RunDir


def source_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``({variable path: array}, description)`` of the network at ``path``.

    Parameters
    ----------
    path
        A segpipe bundle folder (``bundle.json``), a run directory (its best checkpoint, else the
        final model) or a ``.keras`` file.

    Raises
    ------
    ValueError
        Not one of these, an ensemble bundle (start from one member's run), or a file that does not load.
    """
    import keras

    path = Path(path)
    if (path / "bundle.json").is_file():
        bundle = read_bundle(path)
        if bundle.architecture is None:
            raise ValueError(expected("a bundle with Keras weights (model.weights.h5)", key="train.init_from",
                                      received=Received(f"{path} (files: {sorted(bundle.files)})")))
        if bundle.architecture["builder"] == ENSEMBLE:
            raise ValueError(expected("one network, not an ensemble bundle", key="train.init_from", received=str(path),
                                      hint="Start from one of its members' runs (bundle.json lists them)."))
        try:
            net = load_keras_network(bundle.file("keras"), bundle.architecture)
        except BundleError:
            raise
        except Exception as exc:  # a damaged weights file: the runtime's own error types
            raise ValueError(expected("Keras weights that load", key="train.init_from",
                                      received=Received(f"{path} ({first_line(exc)})"))) from exc
        return variable_arrays(net), {"kind": "bundle", "path": str(path.resolve()),
                                      "architecture": bundle.architecture,
                                      "preprocessing": bundle.preprocessing.to_dict()}
    if RunDir(path).is_run():
        kind, model_file = "run", RunDir(path).model_file(None)[1]
    elif path.suffix == ".keras" and path.is_file():
        kind, model_file = "keras", path
    else:
        raise ValueError(expected(
            "a segpipe bundle folder, a run directory or a .keras file", key="train.init_from",
            received=Received(f"{path} ({'no such file or folder' if not path.exists() else 'none of these'})")))
    try:
        model = keras.models.load_model(model_file, compile=False, safe_mode=True)
    except Exception as exc:
        raise ValueError(expected("a Keras model file that loads (safe mode)", key="train.init_from",
                                  received=Received(f"{model_file} ({first_line(exc)})"))) from exc
    return variable_arrays(model), {"kind": kind, "path": str(Path(model_file).resolve())}


def initialise_from(model, path: str | os.PathLike) -> dict[str, Any]:
    """Copy the weights of ``path`` into ``model`` (see the module); returns the record for ``run_info.json``."""
    arrays, source = source_weights(path)
    report = transfer_weights(model, arrays)
    return {"source": source, **report}
