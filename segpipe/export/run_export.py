"""A trained run turned into a bundle: its checkpoint loaded with the config, preprocessing, names and
builder arguments a bundle needs (:func:`load_run_member`), and written (:func:`export_run`).

Writing the bundle itself is :mod:`segpipe.export.bundle`; several runs into one ensemble bundle is
:mod:`segpipe.export.ensemble`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from segpipe.data.labels import Region
from segpipe.data.preprocess import PreprocessSettings
from segpipe.errors import Received, expected, first_line
from segpipe.export.bundle import write_bundle
from segpipe.inference.settings import InferenceSettings
from segpipe.models.architecture import architecture_from_model_config
from segpipe.runs.rundir import RunDir


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    checkpoint: str = "best",
    onnx: bool = False,
    overwrite: bool = False,
    inference: InferenceSettings | Mapping[str, Any] | None = None,
    preprocessing: PreprocessSettings | None = None,
    class_names: Sequence[str] | None = None,
    verify: bool = True,
) -> Path:
    """Write the bundle of a trained run (default ``RUN_DIR/bundle``).

    Parameters
    ----------
    run_dir
        the run directory (``config.yaml``, ``preprocessing.json``, checkpoints).
    out_dir
        bundle folder; defaults to ``RUN_DIR/bundle``.
    checkpoint
        ``"best"`` (``checkpoints/best.keras``), ``"last"`` (the last finished epoch),
        ``"final"`` (``model.keras``), or a path to a ``.keras`` file.
    onnx
        also write ``model.onnx``.
    overwrite
        replace an existing bundle folder.
    inference
        inference settings; default: the run config's ``inference`` section.
    preprocessing
        defaults to ``RUN_DIR/preprocessing.json`` (written at training time).
    class_names
        defaults to the classes of the run's dataset (``data.root``, opened as training
        opens it, so ``data.ignore_label`` and ``data.regions`` apply); ``class_<v>`` if that
        folder is not readable (not for a region run, whose regions only the dataset knows).
    verify
        check the SavedModel/ONNX against Keras after writing.
    """
    member = load_run_member(run_dir, checkpoint, preprocessing=preprocessing, class_names=class_names)
    return write_bundle(
        member.model,
        Path(out_dir) if out_dir is not None else member.run_dir / "bundle",
        class_names=member.class_names,
        preprocessing=member.preprocessing,
        patch_size=member.config.data.patch_size,
        channel_names=member.channel_names,
        architecture=member.architecture,
        inference=member.config.inference if inference is None else inference,
        training_config=member.config.to_dict(),
        source=member.source,
        regions=member.regions,
        regions_class_order=member.regions_class_order,
        ignore_label=member.ignore_label,
        onnx=onnx,
        verify=verify,
        overwrite=overwrite,
    )


@dataclass
class RunMember:
    """A trained run's network with everything a bundle needs from the run (:func:`load_run_member`)."""

    run_dir: Path
    config: Any  # segpipe.config.Config
    model: Any  # keras.Model
    architecture: dict[str, Any]
    preprocessing: PreprocessSettings
    class_names: list[str]
    channel_names: list[str] | None
    source: dict[str, str]
    regions: tuple[Region, ...] | None = None  # a region run's regions (one sigmoid output each)
    regions_class_order: tuple[int, ...] | None = None
    ignore_label: int | None = None


def load_run_member(run_dir: str | os.PathLike, checkpoint: str = "best", *,
                    preprocessing: PreprocessSettings | None = None,
                    class_names: Sequence[str] | None = None) -> RunMember:
    """Load a run's checkpoint with its config, preprocessing, names and builder arguments.

    The run is the user's own (its checkpoint is loaded with Keras, safe mode on); what a bundle
    then holds loads without running code.
    """
    import keras

    from segpipe.models.unet3d import output_channels, outputs_sigmoid  # Keras, as above

    run = RunDir(run_dir)
    config = run.config()
    _, model_path = run.model_file(checkpoint)
    if preprocessing is None:
        preprocessing = run.preprocessing()
    if preprocessing is None:
        raise FileNotFoundError(expected(
            "the run's resolved preprocessing (written at training time)", key="preprocessing.json",
            received=Received(f"{run.preprocessing_json} (no such file)"),
            hint="Pass preprocessing=PreprocessSettings(...) to export an older run."))
    try:
        model = keras.models.load_model(model_path, compile=False)  # safe_mode stays on
    except Exception as exc:
        raise ValueError(expected("a Keras model file that loads", key="checkpoint",
                                  received=Received(f"{model_path} (cannot load: {first_line(exc)})"))) from exc
    num_outputs = output_channels(model)  # what inference_model(model) outputs, without its float32 copy
    dataset = _run_dataset(config, sigmoid=outputs_sigmoid(model))
    regions = dataset.regions if dataset is not None else None
    if regions and len(regions) != num_outputs:
        raise ValueError(expected(f"a dataset with the model's {num_outputs} regions", key="data.regions",
                                  received=Received(f"{config.data.root} with regions {[g.name for g in regions]}")))
    architecture = architecture_from_model_config(config.model, in_channels=int(model.inputs[0].shape[-1]),
                                                  num_classes=num_outputs, output="sigmoid" if regions else None)
    channel_names = None
    if class_names is None:
        class_names, channel_names = _dataset_names(dataset, config.data.root, num_outputs)
    return RunMember(run.path, config, model, architecture, preprocessing, list(class_names), channel_names,
                     {"run_dir": str(run.path.resolve()), "checkpoint": checkpoint,
                      "model_file": str(model_path.resolve())},
                     regions=regions, regions_class_order=dataset.regions_class_order if regions else None,
                     ignore_label=dataset.ignore_label if dataset is not None else None)


def _run_dataset(config, *, sigmoid: bool):
    """The run's dataset opened as training opens it (``data.ignore_label``, ``data.regions`` applied); None
    (with a warning) if it cannot be read, unless the network is a region network, which needs its regions."""
    from segpipe.data.pipeline import open_dataset  # the config layer: only exporting a run needs it

    try:
        return open_dataset(config.data)
    except (OSError, ValueError) as exc:
        if sigmoid:
            raise ValueError(expected("the run's dataset, readable: a region network's bundle needs its regions and "
                                      "regions_class_order", key="data.root",
                                      received=Received(f"{config.data.root} ({first_line(exc)})"))) from exc
        warnings.warn(f"Cannot read the run's dataset {config.data.root} for class names ({first_line(exc)}); "
                      "using class_<value>", stacklevel=4)
        return None


def _dataset_names(dataset, root: str, num_classes: int) -> tuple[list[str], list[str] | None]:
    """Class and channel names from the run's dataset; generic names without it."""
    if dataset is None:
        return [f"class_{v}" if v else "background" for v in range(num_classes)], None
    names = dataset.class_names
    if dataset.regions:  # the label values of the label maps: the classes, up to the largest region value
        return names, list(dataset.channel_names) or None
    if len(names) != num_classes:
        raise ValueError(expected(f"a dataset with the model's {num_classes} classes", key="data.root",
                                  received=Received(f"{root} with {len(names)} classes {names}")))
    return names, list(dataset.channel_names) or None
