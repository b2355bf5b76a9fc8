"""Deployable model bundles: write one from a trained model or run, read and check one, load its network.

A bundle is a folder with everything prediction on a new scan needs and nothing from the training
run (no run directory, no dataset)::

    BUNDLE/
      bundle.json    classes, input channels, preprocessing (target spacing, normalisation and its
                     statistics, cropping), orientation, patch size, inference settings, versions,
                     the training config, and the files below
      model.keras    the network with a single full-resolution softmax output (deep-supervision
                     heads dropped); only standard Keras layers, loads in safe mode
      savedmodel/    TensorFlow SavedModel; signature ``serving_default``: input ``image`` float32
                     (B, X, Y, Z, Cin), any spatial size the network divides, output ``output_0``
                     probabilities (B, X, Y, Z, C)
                     and signature ``segment``: a raw scan -> its label map, everything in the
                     TensorFlow graph (:mod:`segpipe.export.serving_graph`; runs without segpipe)
      model.onnx     optional (``onnx=True``, needs ``pip install "segpipe[onnx]"``); same input and output
      openvino/      ``model.xml`` + ``model.bin``, OpenVINO IR; written when ``openvino`` is installed
                     (``pip install "segpipe[openvino]"``) unless ``openvino=False``; same input and output

The folder is written under a temporary name and renamed into place, and ``bundle.json`` is written
last, so a crash never leaves a bundle that looks complete. After writing, the SavedModel and ONNX
and OpenVINO files are loaded back and checked against the Keras model on a random patch (max abs
probability difference ≤ ``VERIFY_TOLERANCE``, bfloat16 OpenVINO ≤ ``BF16_TOLERANCE`` where the CPU has
bfloat16 units); the differences are recorded in ``bundle.json`` under ``verification``. The check is
never skipped silently: a format whose runtime is missing is either an error (asked for) or not
written, and ``bundle.json`` says which under ``formats_not_written``.

:func:`read_bundle` validates ``bundle.json`` and the files it names and raises :class:`BundleError`
naming the file or key that is wrong. :func:`load_predictor` turns a bundle into a
``predict_fn`` for :func:`segpipe.inference.sliding_window.sliding_window_predict` with any runtime
of :mod:`segpipe.export.runtimes` (``format="auto"``: the fastest installed one).
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import segpipe
from segpipe.data.layouts import load_dataset
from segpipe.data.preprocess import ORIENTATION, PreprocessSettings, preprocess_volume, restore_to_original
from segpipe.errors import Received, SettingError, expected
from segpipe.export import runtimes, serving_graph
from segpipe.export.runtimes import BF16_TOLERANCE
from segpipe.inference.settings import InferenceSettings
from segpipe.inference.sliding_window import PredictFn, keras_predict_fn, sliding_window_predict
from segpipe.io import write_json
from segpipe.runs.rundir import RunDir

BUNDLE_FORMAT = "segpipe-bundle"
BUNDLE_VERSION = 1
FORMATS = runtimes.FILE_FORMATS  # the model files a bundle can hold
FILES = {fmt: runtimes.RUNTIMES[fmt].file for fmt in FORMATS}
SEGMENT_SIGNATURE = "segment"
SEGMENT_AGREEMENT = 0.999  # least share of equal labels between the segment signature and predict.py
SIGNATURE = "serving_default"
INPUT_NAME = "image"
VERIFY_TOLERANCE = 1e-4


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file or key and what is wrong."""


@dataclass(frozen=True)
class Bundle:
    """A validated bundle folder (see :func:`read_bundle`)."""

    path: Path
    class_names: tuple[str, ...]  # indexed by label value = output channel
    input_channels: int
    channel_names: tuple[str, ...]
    preprocessing: PreprocessSettings
    orientation: str
    patch_size: tuple[int, int, int]
    inference: InferenceSettings
    files: dict[str, str]  # format -> path relative to the bundle
    versions: dict[str, str]
    training_config: dict[str, Any] = field(repr=False)
    meta: dict[str, Any] = field(repr=False)  # the whole bundle.json

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def file(self, fmt: str) -> Path:
        """Path of the model file of format ``fmt`` (``keras``, ``savedmodel``, ``onnx``)."""
        if fmt not in FORMATS:
            raise ValueError(expected(f"one of {FORMATS}", key="format", received=fmt))
        if fmt not in self.files:
            how = {"onnx": " (export with onnx=True / --onnx)",
                   "openvino": ' (export with openvino installed: pip install "segpipe[openvino]")'}.get(fmt, "")
            reason = self.meta.get("formats_not_written", {}).get(fmt)
            raise BundleError(expected(f"a '{fmt}' model in the bundle{how}", key="files", received=sorted(self.files),
                                       where=str(self.path / "bundle.json"),
                                       hint=f"Not written: {reason}." if reason else None))
        return self.path / self.files[fmt]


# ----------------------------------------------------------------------------------------------
# Writing


def inference_model(model):
    """The network with one output, the full-resolution probabilities, as a plain functional Keras model.

    A deep-supervision model lists its full-resolution output first; the lower heads only serve the
    training loss. A logits head (``model.output: logits``) gets a softmax, so every export format
    returns probabilities. The result shares the layers (and weights) of ``model``
    (:func:`segpipe.models.unet3d.probability_model`).
    """
    from segpipe.models.unet3d import probability_model  # loads Keras: only when writing a bundle

    return probability_model(model)


def activation_bytes_per_voxel(net, window: Sequence[int]) -> int:
    """Float32 bytes of all layer outputs of one forward pass per window voxel (shapes only, nothing runs).

    An upper bound of a forward pass's working memory (runtimes free most feature maps as they go),
    for :func:`segpipe.inference.sliding_window.batch_size_for_memory`; recorded in ``bundle.json``.
    """
    import keras

    window = tuple(int(w) for w in window)
    probe = keras.Model(net.inputs, [layer.output for layer in net.layers[1:]])
    specs = probe.compute_output_spec(keras.KerasTensor((1, *window, int(net.inputs[0].shape[-1]))))
    total = sum(4 * math.prod(int(d) for d in spec.shape[1:]) for spec in keras.tree.flatten(specs))
    return int(math.ceil(total / math.prod(window)))


def _write_savedmodel(net, path: Path, signature: list, *, segment: bool, not_written: dict[str, str],
                      preprocessing: PreprocessSettings, patch_size: tuple[int, ...], inference: InferenceSettings) -> list[str]:
    """The SavedModel: ``serving_default`` (windows) and, if possible, ``segment`` (raw scan -> labels)."""
    import keras

    archive = keras.export.ExportArchive()
    archive.track(net)
    archive.add_endpoint(SIGNATURE, lambda image: net(image, training=False), input_signature=signature)
    names = [SIGNATURE]
    reason = serving_graph.unsupported_reason(preprocessing) if segment else "segment=False"
    if reason is None:
        fn = serving_graph.build_segment_function(
            net, preprocessing=preprocessing, patch_size=patch_size, overlap=inference.overlap,
            mirror_axes=inference.mirror_axes, batch_size=inference.batch_size, sigma_scale=inference.sigma_scale,
            in_channels=int(net.inputs[0].shape[-1]),
        )
        archive.add_endpoint(SEGMENT_SIGNATURE, fn)
        names.append(SEGMENT_SIGNATURE)
    else:
        not_written[f"savedmodel:{SEGMENT_SIGNATURE}"] = reason
    archive.write_out(str(path), verbose=False)
    return names


def write_bundle(
    model,
    out_dir: str | os.PathLike,
    *,
    class_names: Sequence[str],
    preprocessing: PreprocessSettings,
    patch_size: Sequence[int],
    channel_names: Sequence[str] | None = None,
    inference: InferenceSettings | Mapping[str, Any] | None = None,
    training_config: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    onnx: bool = False,
    openvino: bool | None = None,
    segment: bool = True,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a bundle for ``model`` (a trained segpipe U-Net, deep supervision or not) to ``out_dir``.

    Args:
        model: the trained Keras model (softmax output(s), channels-last input).
        out_dir: the bundle folder to create.
        class_names: names indexed by label value; one per output channel.
        preprocessing: the resolved preprocessing of training (target spacing, normalisation
            statistics); new scans go through exactly this.
        patch_size: the training patch size, used as the sliding window.
        channel_names: names of the input channels (defaults to ``channel_<i>``).
        inference: default inference settings stored in the bundle.
        training_config: the run's resolved config (stored for provenance).
        source: free-form provenance (run directory, checkpoint).
        onnx: also write ``model.onnx`` (needs tf2onnx, and onnxruntime for the check).
        openvino: write ``openvino/model.xml``: ``None`` (default) when ``openvino`` is installed
            (otherwise ``bundle.json`` records under ``formats_not_written`` why not), ``True``
            insists (error without it), ``False`` never.
        segment: add the ``segment`` signature (raw scan -> labels, :mod:`segpipe.export.serving_graph`)
            to the SavedModel; settings it cannot reproduce leave it out, recorded like a format.
        verify: load every exported format back and check it against Keras (``bundle.json``
            records ``verification``; ``False`` records that it was not run).
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        ImportError: ``onnx=True`` without tf2onnx/onnxruntime, or ``openvino=True`` without openvino.
        BundleError: an exported format disagrees with Keras by more than ``VERIFY_TOLERANCE``.
    """
    out_dir = Path(out_dir)
    openvino, not_written = _export_formats(out_dir, onnx=onnx, openvino=openvino, verify=verify, overwrite=overwrite)
    inference, patch_size = _checked_settings(preprocessing, inference, patch_size)
    net = inference_model(model)
    class_names, channel_names = _checked_names(net, class_names, channel_names)
    inference.check_classes(len(class_names))

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files, signatures = _write_model_files(net, tmp, onnx=onnx, openvino=openvino, segment=segment,
                                               not_written=not_written, preprocessing=preprocessing,
                                               patch_size=patch_size, inference=inference)
        meta = _bundle_meta(net, class_names=class_names, channel_names=channel_names, preprocessing=preprocessing,
                            patch_size=patch_size, inference=inference, files=files, not_written=not_written,
                            signatures=signatures, onnx=onnx, openvino=openvino, source=source,
                            training_config=training_config)
        meta["verification"] = _verify(net, tmp, files, patch_size, len(channel_names)) if verify else {"run": False}
        if verify and SEGMENT_SIGNATURE in signatures:
            meta["verification"].update(_verify_segment(net, tmp / FILES["savedmodel"], preprocessing, patch_size, inference))
        write_json(tmp / "bundle.json", meta)  # last: its presence marks the bundle complete
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _export_formats(out_dir: Path, *, onnx: bool, openvino: bool | None, verify: bool,
                    overwrite: bool) -> tuple[bool, dict[str, str]]:
    """Whether to write OpenVINO, and the formats not written with why; fails before any work."""
    if out_dir.exists() and not overwrite:
        raise FileExistsError(expected("a new bundle folder", key="out_dir", received=Received(f"{out_dir} (exists)"),
                                       hint="Use overwrite=True (--overwrite) or another folder."))
    if onnx and (importlib.util.find_spec("tf2onnx") is None or (verify and not runtimes.is_installed("onnx"))):
        raise ImportError(expected("tf2onnx (and onnxruntime to check it) installed for the ONNX export", key="onnx",
                                   received=True, hint=runtimes.install_hint("onnx")))
    if openvino and not runtimes.is_installed("openvino"):
        raise ImportError(expected(f"{runtimes.needs('openvino')} for the OpenVINO export", key="openvino",
                                   received=True, hint=runtimes.install_hint("openvino")))
    not_written: dict[str, str] = {}
    if openvino is None:
        openvino = runtimes.is_installed("openvino")
        if not openvino:
            not_written["openvino"] = 'openvino is not installed (pip install "segpipe[openvino]")'
    return bool(openvino), not_written


def _checked_settings(preprocessing: Any, inference: InferenceSettings | Mapping[str, Any] | None,
                      patch_size: Sequence[int]) -> tuple[InferenceSettings, tuple[int, int, int]]:
    """The inference settings and the patch size a bundle stores, checked."""
    if not isinstance(preprocessing, PreprocessSettings):
        raise TypeError(expected("a PreprocessSettings", key="preprocessing",
                                 received=Received(f"a {type(preprocessing).__name__}")))
    inference = inference if isinstance(inference, InferenceSettings) else InferenceSettings.from_mapping(inference or {})
    patch_size = tuple(int(s) for s in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(expected("3 positive sizes", key="patch_size", received=list(patch_size)))
    return inference, patch_size


def _checked_names(net, class_names: Sequence[str], channel_names: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Class names (one per output channel) and channel names (one per input channel, default ``channel_<i>``)."""
    in_channels, num_classes = int(net.inputs[0].shape[-1]), int(net.outputs[0].shape[-1])
    class_names = [str(n) for n in class_names]
    if len(class_names) != num_classes:
        raise ValueError(expected(f"one class name per model output channel ({num_classes})", key="class_names",
                                  received=class_names))
    channel_names = [str(n) for n in channel_names] if channel_names else [f"channel_{i}" for i in range(in_channels)]
    if len(channel_names) != in_channels:
        raise ValueError(expected(f"one channel name per model input channel ({in_channels})", key="channel_names",
                                  received=channel_names))
    return class_names, channel_names


def _write_model_files(net, folder: Path, *, onnx: bool, openvino: bool, segment: bool, not_written: dict[str, str],
                       preprocessing: PreprocessSettings, patch_size: tuple[int, ...],
                       inference: InferenceSettings) -> tuple[dict[str, str], list[str]]:
    """Every model file of the bundle into ``folder``; returns ``files`` (format -> path) and the SavedModel's signatures."""
    import tensorflow as tf

    in_channels = int(net.inputs[0].shape[-1])
    files = {"keras": FILES["keras"], "savedmodel": FILES["savedmodel"]}
    net.save(folder / FILES["keras"])
    signature = [tf.TensorSpec((None, None, None, None, in_channels), tf.float32, name=INPUT_NAME)]
    signatures = _write_savedmodel(net, folder / FILES["savedmodel"], signature, segment=segment, not_written=not_written,
                                   preprocessing=preprocessing, patch_size=patch_size, inference=inference)
    if onnx:
        runtimes.export_onnx(net, folder / FILES["onnx"], signature)
        files["onnx"] = FILES["onnx"]
    if openvino:
        runtimes.export_openvino(net, folder / FILES["openvino"], signature)
        files["openvino"] = FILES["openvino"]
    return files, signatures


def _bundle_meta(net, *, class_names: list[str], channel_names: list[str], preprocessing: PreprocessSettings,
                 patch_size: tuple[int, ...], inference: InferenceSettings, files: dict[str, str],
                 not_written: dict[str, str], signatures: list[str], onnx: bool, openvino: bool,
                 source: Mapping[str, Any] | None, training_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The contents of ``bundle.json`` (without ``verification``)."""
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "classes": [{"value": v, "name": n} for v, n in enumerate(class_names)],
        "input_channels": len(channel_names),
        "channel_names": channel_names,
        "orientation": ORIENTATION,
        "preprocessing": preprocessing.to_dict(),
        "patch_size": list(patch_size),
        "inference": inference.to_dict(),
        "files": files,
        "formats_not_written": not_written,
        "signature": {"name": SIGNATURE, "input": INPUT_NAME},
        "signatures": signatures,
        "activation_bytes_per_voxel": activation_bytes_per_voxel(net, patch_size),
        "versions": _versions(onnx, openvino),
        "source": dict(source or {}),
        "training_config": dict(training_config or {}),
    }


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

    Args:
        run_dir: the run directory (``config.yaml``, ``preprocessing.json``, checkpoints).
        out_dir: bundle folder; defaults to ``RUN_DIR/bundle``.
        checkpoint: ``"best"`` (``checkpoints/best.keras``), ``"last"`` (the last finished epoch),
            ``"final"`` (``model.keras``), or a path to a ``.keras`` file.
        onnx: also write ``model.onnx``.
        overwrite: replace an existing bundle folder.
        inference: inference settings; default: the run config's ``inference`` section.
        preprocessing: defaults to ``RUN_DIR/preprocessing.json`` (written at training time).
        class_names: defaults to the classes of the run's dataset (``data.root``); ``class_<v>`` if
            that folder is not readable.
        verify: check the SavedModel/ONNX against Keras after writing.
    """
    import keras

    run = RunDir(run_dir)
    run_dir = run.path
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
                                  received=Received(f"{model_path} (cannot load: {_first_line(exc)})"))) from exc
    num_classes = int(inference_model(model).outputs[0].shape[-1])
    channel_names = None
    if class_names is None:
        class_names, channel_names = _dataset_names(config.data.root, num_classes)
    if inference is None:
        inference = config.inference
    return write_bundle(
        model,
        Path(out_dir) if out_dir is not None else run_dir / "bundle",
        class_names=class_names,
        preprocessing=preprocessing,
        patch_size=config.data.patch_size,
        channel_names=channel_names,
        inference=inference,
        training_config=config.to_dict(),
        source={"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint, "model_file": str(model_path.resolve())},
        onnx=onnx,
        verify=verify,
        overwrite=overwrite,
    )


# ----------------------------------------------------------------------------------------------
# Reading


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read and validate a bundle folder (or its ``bundle.json``).

    Raises:
        BundleError: the folder or ``bundle.json`` is missing, the JSON is invalid, a key is missing
            or has a wrong type or value, the format version is not supported, or a model file it
            names is missing. The message names the file or key.
    """
    path, meta = _read_bundle_json(Path(path))
    fields = _BundleFields(meta, str(path / "bundle.json"))
    _check_format(fields)
    classes = _read_classes(fields)
    input_channels, channel_names = _read_channels(fields)
    orientation = _read_orientation(fields)
    preprocessing = _read_preprocessing(fields)
    patch_size = _read_patch_size(fields)
    inference = _read_inference(fields)
    files = _read_files(fields, path)
    versions = fields.get("versions", dict, "a mapping package -> version")
    _warn_on_version_change(versions)
    return Bundle(
        path=path,
        class_names=tuple(c["name"] for c in classes),
        input_channels=input_channels,
        channel_names=tuple(str(n) for n in channel_names),
        preprocessing=preprocessing,
        orientation=orientation,
        patch_size=tuple(patch_size),
        inference=inference,
        files=dict(files),
        versions={str(k): str(v) for k, v in versions.items()},
        training_config=dict(meta.get("training_config") or {}),
        meta=meta,
    )


def _read_bundle_json(path: Path) -> tuple[Path, dict[str, Any]]:
    """The bundle folder and its parsed ``bundle.json`` (a JSON object)."""
    if path.name == "bundle.json" and path.is_file():
        path = path.parent
    if not path.is_dir():
        raise BundleError(expected("a bundle folder", key="bundle", received=Received(f"{path} (no such folder)")))
    json_path = path / "bundle.json"
    if not json_path.is_file():
        raise BundleError(expected("bundle.json in the bundle folder (it is written last: without it the bundle is "
                                   "incomplete)", key="bundle.json", received=Received(f"{json_path} (no such file)")))
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(expected("valid JSON", key="contents", received=Received(f"invalid JSON ({exc})"),
                                   where=str(json_path))) from exc
    if not isinstance(meta, dict):
        raise BundleError(expected("a JSON object", key="contents", received=Received(f"a {type(meta).__name__}"),
                                   where=str(json_path)))
    return path, meta


class _BundleFields:
    """The keys of a ``bundle.json``, each read with its type checked; errors name the file and key."""

    def __init__(self, meta: dict[str, Any], where: str):
        self.meta, self.where = meta, where

    def get(self, key: str, kind: type | tuple[type, ...], description: str) -> Any:
        if key not in self.meta:
            raise BundleError(expected(description, key=key, received=Received("<missing>"), where=self.where))
        value = self.meta[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise BundleError(expected(description, key=key, received=value, where=self.where))
        return value


def _check_format(fields: _BundleFields) -> None:
    """``format`` names a segpipe bundle and ``format_version`` is one this segpipe reads."""
    if fields.get("format", str, f"the string {BUNDLE_FORMAT!r}") != BUNDLE_FORMAT:
        raise BundleError(expected(f"the string {BUNDLE_FORMAT!r} (a segpipe bundle)", key="format",
                                   received=fields.meta["format"], where=fields.where))
    version = fields.get("format_version", int, f"the integer {BUNDLE_VERSION}")
    if version != BUNDLE_VERSION:
        newer = "Written by a newer segpipe: upgrade segpipe." if version > BUNDLE_VERSION else None
        raise BundleError(expected(f"format version {BUNDLE_VERSION}", key="format_version", received=version,
                                   where=fields.where, hint=newer))


def _read_classes(fields: _BundleFields) -> list[dict[str, Any]]:
    classes = fields.get("classes", list, "a list of {'value': int, 'name': str}")
    if len(classes) < 2 or any(
        not isinstance(c, dict) or c.get("value") != i or not isinstance(c.get("name"), str) for i, c in enumerate(classes)
    ):
        raise BundleError(expected("at least 2 entries {'value': i, 'name': str} with values 0, 1, 2, ... in order",
                                   key="classes", received=classes, where=fields.where))
    return classes


def _read_channels(fields: _BundleFields) -> tuple[int, list[Any]]:
    """``input_channels`` and ``channel_names`` (default ``channel_<i>``), one name per channel."""
    input_channels = fields.get("input_channels", int, "a positive integer")
    if input_channels < 1:
        raise BundleError(expected("a positive integer", key="input_channels", received=input_channels, where=fields.where))
    channel_names = fields.meta.get("channel_names") or [f"channel_{i}" for i in range(input_channels)]
    if not isinstance(channel_names, list) or len(channel_names) != input_channels:
        raise BundleError(expected(f"{input_channels} names (one per input channel)", key="channel_names",
                                   received=channel_names, where=fields.where))
    return input_channels, channel_names


def _read_orientation(fields: _BundleFields) -> str:
    orientation = fields.get("orientation", str, "'RAS'")
    if orientation != ORIENTATION:
        raise BundleError(expected("'RAS' (the only orientation preprocessing produces)", key="orientation",
                                   received=orientation, where=fields.where))
    return orientation


def _read_preprocessing(fields: _BundleFields) -> PreprocessSettings:
    """``preprocessing``, validated by :class:`PreprocessSettings` (errors keyed ``preprocessing.<key>``)."""
    settings = fields.get("preprocessing", dict, "the preprocessing settings")
    try:
        return PreprocessSettings.from_dict(settings, where=fields.where, prefix="preprocessing.")
    except ValueError as exc:  # worded by PreprocessSettings.from_dict: the file, preprocessing.<key>, values
        raise BundleError(str(exc)) from None


def _read_patch_size(fields: _BundleFields) -> list[int]:
    patch_size = fields.get("patch_size", list, "3 positive integers")
    if len(patch_size) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in patch_size):
        raise BundleError(expected("3 positive integers", key="patch_size", received=patch_size, where=fields.where))
    return patch_size


def _read_inference(fields: _BundleFields) -> InferenceSettings:
    """``inference``, validated by :class:`InferenceSettings` (errors keyed ``inference.<key>``)."""
    settings = fields.get("inference", dict, "the inference settings")
    try:
        return InferenceSettings.from_mapping(settings)
    except SettingError as exc:
        raise BundleError(expected(exc.what, key="inference." + exc.key, received=exc.received, where=fields.where,
                                   hint=exc.hint)) from None
    except (TypeError, ValueError) as exc:  # e.g. mirror_axes that is not a list
        raise BundleError(expected("the inference settings", key="inference", received=settings,
                                   where=fields.where, hint=_first_line(exc))) from exc


def _read_files(fields: _BundleFields, folder: Path) -> dict[str, str]:
    """``files``: format -> a path inside the bundle that exists (the marker files of folders too)."""
    files = fields.get("files", dict, "a mapping format -> file")
    unknown = sorted(set(files) - set(FORMATS))
    if "keras" not in files or unknown:
        raise BundleError(expected(f"'keras' (and optionally {', '.join(repr(f) for f in FORMATS[1:])})", key="files",
                                   received=sorted(files), where=fields.where))
    for fmt, name in files.items():
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(expected("a path inside the bundle", key=f"files.{fmt}", received=name, where=fields.where))
        target = folder / name
        markers = {"savedmodel": [target / "saved_model.pb"], "openvino": [target, target.with_suffix(".bin")]}.get(fmt, [target])
        for marker in markers:
            if not marker.is_file():
                raise BundleError(expected(
                    "every model file bundle.json lists", key=f"files.{fmt}", where=fields.where,
                    received=Received(f"{name} (missing: {marker.relative_to(folder)}; incomplete bundle?)")))
    return files


def load_predictor(bundle: Bundle | str | os.PathLike, format: str = "keras", *, threads: int | None = None) -> PredictFn:
    """A ``predict_fn`` (float32 (B, X, Y, Z, Cin) -> probabilities (B, X, Y, Z, C)) from a bundle.

    ``keras`` loads ``model.keras`` in safe mode, ``savedmodel`` the serving signature, ``onnx``
    an ONNX Runtime CPU session, ``openvino`` / ``openvino-bf16`` the OpenVINO CPU plugin in
    float32 / bfloat16, ``auto`` the fastest of them the bundle holds and this machine has
    (:func:`segpipe.export.runtimes.choose_format`). The network's input channels and classes are checked
    against ``bundle.json``. The returned function has attributes ``format`` (the runtime used) and
    ``activation_bytes_per_voxel`` (from ``bundle.json``, for memory budgets).

    Args:
        bundle: a bundle or its folder.
        format: a runtime name of :data:`segpipe.export.runtimes.RUNTIMES` or ``"auto"``.
        threads: CPU threads for ONNX Runtime and OpenVINO (``None``: their default, all cores).

    Raises:
        BundleError: the model file is missing, unreadable or does not match ``bundle.json``.
        ImportError: the runtime is not installed.
    """
    bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    runtimes.runtime(format) if format != "auto" else None  # an unknown name is a ValueError
    if format == "auto":
        format = runtimes.choose_format(bundle.files, "auto")
    path = bundle.file(runtimes.file_format(format))
    if format != "keras" and not runtimes.is_installed(format):
        raise ImportError(expected(f"{runtimes.needs(format)} to predict with it", key="format", received=format,
                                   hint=runtimes.install_hint(format)))
    verification = bundle.meta.get("verification") or {}
    if format == "openvino-bf16" and verification.get("openvino-bf16_within_tolerance") is False:
        raise BundleError(expected(
            f"bfloat16 probabilities within {BF16_TOLERANCE} of Keras (checked at export)", key="format",
            received=format, where=str(bundle.path / "bundle.json"),
            hint=f"This network differs by {verification.get('openvino-bf16_max_abs_diff', float('nan')):.3g}; "
                 "use format='openvino' (float32)."))
    try:
        if format == "keras":
            predict_fn, found = runtimes.load_keras(path)
        elif format == "savedmodel":
            predict_fn, found = runtimes.load_savedmodel(path, SIGNATURE, INPUT_NAME)
        elif format == "onnx":
            predict_fn, found = runtimes.load_onnx(path, threads)
        else:
            predict_fn, found = runtimes.load_openvino(path, precision="bf16" if format == "openvino-bf16" else "f32",
                                                       threads=threads)
    except ImportError:
        raise
    except Exception as exc:  # a truncated or corrupt file: each runtime raises its own types
        raise BundleError(expected(f"a model file that loads with format={format!r}",
                                   key=f"files.{runtimes.file_format(format)}",
                                   received=Received(f"{path} (cannot load: {_first_line(exc)})"),
                                   where=str(bundle.path / "bundle.json"))) from exc
    _check_io(path, found, (bundle.input_channels, bundle.num_classes))
    predict_fn.format = format
    predict_fn.activation_bytes_per_voxel = bundle.meta.get("activation_bytes_per_voxel", 0)
    return predict_fn


# ----------------------------------------------------------------------------------------------


def _dataset_names(root: str, num_classes: int) -> tuple[list[str], list[str] | None]:
    """Class and channel names from the run's dataset; generic names if it cannot be read."""
    try:
        dataset = load_dataset(root)
    except (OSError, ValueError) as exc:
        warnings.warn(f"Cannot read the run's dataset {root} for class names ({exc}); using class_<value>", stacklevel=3)
        return [f"class_{v}" if v else "background" for v in range(num_classes)], None
    names = dataset.class_names
    if len(names) != num_classes:
        raise ValueError(expected(f"a dataset with the model's {num_classes} classes", key="data.root",
                                  received=Received(f"{root} with {len(names)} classes {names}")))
    return names, list(dataset.channel_names) or None


def _versions(onnx: bool, openvino: bool) -> dict[str, str]:
    import keras
    import tensorflow as tf

    versions = {
        "segpipe": segpipe.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    if onnx:
        import onnx as onnx_module
        import onnxruntime
        import tf2onnx

        versions.update(onnx=onnx_module.__version__, tf2onnx=tf2onnx.__version__, onnxruntime=onnxruntime.__version__)
    if openvino:
        import openvino as openvino_module

        versions.update(openvino=openvino_module.__version__)
    return versions


def _verify(net, folder: Path, files: dict[str, str], patch_size: tuple[int, ...], in_channels: int) -> dict[str, Any]:
    """Max abs probability difference of each exported format against Keras on a random patch.

    Every written format is checked (its runtime was required to write it); ``openvino`` also in
    bfloat16 where the CPU computes in it (it then differs by more than float32 rounding, so it is
    held to ``BF16_TOLERANCE``). Raises :class:`BundleError` for a format out of tolerance.
    """
    x = np.random.default_rng(0).normal(size=(1, *patch_size, in_channels)).astype(np.float32)
    reference = np.asarray(net.predict_on_batch(x))
    stub = Bundle(folder, ("",) * reference.shape[-1], in_channels, (), PreprocessSettings(), ORIENTATION,
                  patch_size, InferenceSettings(), files, {}, {}, {})
    checks = [(fmt, VERIFY_TOLERANCE) for fmt in files if fmt != "keras"]
    if "openvino" in files:
        checks.append(("openvino-bf16", BF16_TOLERANCE))
    report: dict[str, Any] = {"run": True, "tolerance": VERIFY_TOLERANCE}
    for fmt, tolerance in checks:
        diff = float(np.abs(load_predictor(stub, fmt)(x) - reference).max())
        report[f"{fmt}_max_abs_diff"] = diff
        if fmt == "openvino-bf16":
            # a precision mode of the openvino file, not a file: out of tolerance it is refused when
            # asked for (load_predictor), the float32 formats stay usable
            report["openvino-bf16_within_tolerance"] = diff <= tolerance
        elif not diff <= tolerance:
            raise BundleError(expected(f"the exported {fmt} model within {tolerance} of Keras (max abs probability "
                                       "difference on a random patch)", key=f"{fmt}_max_abs_diff", received=diff))
    return report


def _verify_segment(net, savedmodel: Path, preprocessing: PreprocessSettings, patch_size: tuple[int, ...],
                    inference: InferenceSettings) -> dict[str, float]:
    """Labels of the ``segment`` signature against the NumPy path with Keras.

    The NumPy path is :func:`segpipe.inference.segment.segment_volume`'s steps (preprocess, sliding
    window, probabilities back linearly, argmax; no post-processing, which the signature leaves out),
    spelled out here because that module imports this one. The scan is random (2 windows per axis at
    the training spacing, with a zero margin to crop); with a target spacing it comes 20 % finer
    along one axis, so resampling there and back runs.
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    target = np.asarray(preprocessing.target_spacing_mm or (1.0, 1.0, 1.0))
    spacing = target * np.array([0.8, 1.0, 1.0]) if preprocessing.target_spacing_mm else target
    shape = tuple(int(round(p * 1.25 * t / s)) + 2 for p, t, s in zip(patch_size, target, spacing))
    image = rng.normal(0.0, 1.0, size=(*shape, int(net.inputs[0].shape[-1]))).astype(np.float32)
    image[:2] = 0
    case = preprocess_volume(image, np.diag([*spacing, 1.0]), None, preprocessing)
    probabilities = sliding_window_predict(keras_predict_fn(net), case.image, patch_size, settings=inference)
    background = np.eye(probabilities.shape[-1], dtype=np.float32)[0]
    reference = np.argmax(restore_to_original(probabilities, case.meta, order=1, fill_value=background), axis=-1)
    signature = tf.saved_model.load(str(savedmodel)).signatures[SEGMENT_SIGNATURE]
    labels = signature(image=tf.constant(image), spacing_mm=tf.constant(spacing, tf.float64))["labels"].numpy()
    agreement = float((labels == reference).mean()) if labels.shape == reference.shape else 0.0
    if agreement < SEGMENT_AGREEMENT:
        raise BundleError(expected(
            f"at least {SEGMENT_AGREEMENT:.1%} equal labels between the exported {SEGMENT_SIGNATURE!r} signature and "
            "segment_volume", key="segment_label_agreement",
            received=Received(f"{agreement:.4%} (shape {labels.shape} vs {reference.shape})")))
    return {"segment_label_agreement": agreement}


def _check_io(path: Path, found: tuple[Any, Any], wanted: tuple[int, int]) -> None:
    found = tuple(int(v) if isinstance(v, (int, np.integer)) else v for v in found)
    if found != wanted:
        raise BundleError(expected(
            f"a network with {wanted[0]} input channel(s) and {wanted[1]} classes (from bundle.json)", key="network",
            received=Received(f"{found[0]} input channel(s), {found[1]} output channel(s)"), where=str(path)))


def _first_line(exc: BaseException) -> str:
    """``Type: message`` of an exception, first line only and at most 300 characters (for one-line errors)."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` folder onto ``out_dir``; an old bundle is removed only afterwards."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _warn_on_version_change(versions: Mapping[str, Any]) -> None:
    """Warn when the bundle's Keras major version differs (read without importing TensorFlow)."""
    import importlib.metadata

    written = str(versions.get("keras", ""))
    try:
        installed = importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        return
    if written and written.split(".")[0] != installed.split(".")[0]:
        warnings.warn(f"Bundle written with Keras {written}; this is Keras {installed}", stacklevel=3)
