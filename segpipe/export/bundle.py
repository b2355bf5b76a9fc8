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
from segpipe.errors import Received, expected
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
            raise ValueError(f"Invalid value for `format`. Expected one of {FORMATS}. Received: format={fmt!r}")
        if fmt not in self.files:
            hint = {"onnx": " (export with onnx=True / --onnx)",
                    "openvino": ' (export with openvino installed: pip install "segpipe[openvino]")'}.get(fmt, "")
            if fmt in self.meta.get("formats_not_written", {}):
                hint += f"; not written: {self.meta['formats_not_written'][fmt]}"
            raise BundleError(f"{self.path / 'bundle.json'}: files: expected a '{fmt}' model{hint}. Received: {sorted(self.files)}")
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
    import tensorflow as tf

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"Bundle folder {out_dir} exists. Use overwrite=True (--overwrite) or another folder.")
    if onnx and (importlib.util.find_spec("tf2onnx") is None or (verify and not runtimes.is_installed("onnx"))):
        raise ImportError('ONNX export needs tf2onnx (and onnxruntime to check it). Install the onnx extra: pip install "segpipe[onnx]"')
    not_written: dict[str, str] = {}
    if openvino and not runtimes.is_installed("openvino"):
        raise runtimes.missing_runtime_error("openvino", "OpenVINO export")
    if openvino is None:
        openvino = runtimes.is_installed("openvino")
        if not openvino:
            not_written["openvino"] = 'openvino is not installed (pip install "segpipe[openvino]")'
    if not isinstance(preprocessing, PreprocessSettings):
        raise TypeError(f"Expected preprocessing to be a PreprocessSettings. Received: {type(preprocessing).__name__}")
    inference = inference if isinstance(inference, InferenceSettings) else InferenceSettings.from_mapping(inference or {})
    patch_size = tuple(int(s) for s in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"Expected patch_size of 3 positive sizes. Received: patch_size={list(patch_size)}")

    net = inference_model(model)
    in_channels, num_classes = int(net.inputs[0].shape[-1]), int(net.outputs[0].shape[-1])
    class_names = [str(n) for n in class_names]
    if len(class_names) != num_classes:
        raise ValueError(f"Expected one class name per model output channel ({num_classes}). Received: {len(class_names)} names {class_names}")
    channel_names = [str(n) for n in channel_names] if channel_names else [f"channel_{i}" for i in range(in_channels)]
    if len(channel_names) != in_channels:
        raise ValueError(f"Expected one channel name per model input channel ({in_channels}). Received: {channel_names}")
    inference.check_classes(num_classes)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = {"keras": FILES["keras"], "savedmodel": FILES["savedmodel"]}
        net.save(tmp / FILES["keras"])
        signature = [tf.TensorSpec((None, None, None, None, in_channels), tf.float32, name=INPUT_NAME)]
        signatures = _write_savedmodel(net, tmp / FILES["savedmodel"], signature, segment=segment, not_written=not_written,
                                       preprocessing=preprocessing, patch_size=patch_size, inference=inference)
        if onnx:
            runtimes.export_onnx(net, tmp / FILES["onnx"], signature)
            files["onnx"] = FILES["onnx"]
        if openvino:
            runtimes.export_openvino(net, tmp / FILES["openvino"], signature)
            files["openvino"] = FILES["openvino"]
        meta = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "classes": [{"value": v, "name": n} for v, n in enumerate(class_names)],
            "input_channels": in_channels,
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
        meta["verification"] = _verify(net, tmp, files, patch_size, in_channels) if verify else {"run": False}
        if verify and SEGMENT_SIGNATURE in signatures:
            meta["verification"].update(_verify_segment(net, tmp / FILES["savedmodel"], preprocessing, patch_size, inference))
        write_json(tmp / "bundle.json", meta)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
        raise ValueError(f"Cannot load model {model_path}: {exc}") from exc
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
    path = Path(path)
    if path.name == "bundle.json" and path.is_file():
        path = path.parent
    if not path.is_dir():
        raise BundleError(f"Expected a bundle folder. Received: {path} (no such folder)")
    json_path = path / "bundle.json"
    if not json_path.is_file():
        raise BundleError(f"Expected {json_path} in the bundle. Received: no such file (incomplete bundle?)")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"Invalid JSON in {json_path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{json_path}: expected a JSON object. Received: {type(meta).__name__}")
    where = str(json_path)

    def get(key: str, kind: type | tuple[type, ...], description: str) -> Any:
        if key not in meta:
            raise BundleError(f"{where}: missing required key '{key}' ({description})")
        value = meta[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise BundleError(f"{where}: '{key}': expected {description}. Received: {value!r}")
        return value

    if get("format", str, f"the string {BUNDLE_FORMAT!r}") != BUNDLE_FORMAT:
        raise BundleError(f"{where}: 'format': expected {BUNDLE_FORMAT!r}. Received: {meta['format']!r} (not a segpipe bundle)")
    version = get("format_version", int, f"the integer {BUNDLE_VERSION}")
    if version != BUNDLE_VERSION:
        newer = " (written by a newer segpipe; upgrade segpipe)" if version > BUNDLE_VERSION else ""
        raise BundleError(f"{where}: 'format_version': expected {BUNDLE_VERSION}. Received: {version}{newer}")

    classes = get("classes", list, "a list of {'value': int, 'name': str}")
    if len(classes) < 2 or any(
        not isinstance(c, dict) or c.get("value") != i or not isinstance(c.get("name"), str) for i, c in enumerate(classes)
    ):
        raise BundleError(f"{where}: 'classes': expected at least 2 entries {{'value': i, 'name': str}} with values 0, 1, 2, ... in order. Received: {classes!r}")
    input_channels = get("input_channels", int, "a positive integer")
    if input_channels < 1:
        raise BundleError(f"{where}: 'input_channels': expected a positive integer. Received: {input_channels}")
    channel_names = meta.get("channel_names") or [f"channel_{i}" for i in range(input_channels)]
    if not isinstance(channel_names, list) or len(channel_names) != input_channels:
        raise BundleError(f"{where}: 'channel_names': expected {input_channels} names. Received: {channel_names!r}")
    orientation = get("orientation", str, "'RAS'")
    if orientation != ORIENTATION:
        raise BundleError(f"{where}: 'orientation': expected 'RAS' (the only one preprocessing produces). Received: {orientation!r}")
    try:
        preprocessing = PreprocessSettings.from_dict(get("preprocessing", dict, "the preprocessing settings"),
                                                     where=f"{where}: 'preprocessing'")
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    patch_size = get("patch_size", list, "3 positive sizes")
    if len(patch_size) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in patch_size):
        raise BundleError(f"{where}: 'patch_size': expected 3 positive integers. Received: {patch_size!r}")
    try:
        inference = InferenceSettings.from_mapping(get("inference", dict, "the inference settings"))
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: 'inference': {exc}") from exc
    files = get("files", dict, "a mapping format -> file")
    unknown = sorted(set(files) - set(FORMATS))
    if "keras" not in files or unknown:
        raise BundleError(f"{where}: 'files': expected 'keras' (and optionally {', '.join(repr(f) for f in FORMATS[1:])}). Received: {sorted(files)}")
    for fmt, name in files.items():
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{where}: 'files.{fmt}': expected a path inside the bundle. Received: {name!r}")
        target = path / name
        markers = {"savedmodel": [target / "saved_model.pb"], "openvino": [target, target.with_suffix(".bin")]}.get(fmt, [target])
        for marker in markers:
            if not marker.is_file():
                raise BundleError(f"Bundle {path}: missing file {marker.relative_to(path)} (listed as files.{fmt} in bundle.json; incomplete bundle?)")
    versions = get("versions", dict, "a mapping package -> version")
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
        raise runtimes.missing_runtime_error(format, f"Predicting with format={format!r}")
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
    except Exception as exc:
        raise BundleError(f"Cannot load {path} ({format}): {exc}") from exc
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
        raise ValueError(f"Expected the dataset {root} to have the model's {num_classes} classes. Received: {len(names)} ({names})")
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
            raise BundleError(f"Exported {fmt} model disagrees with Keras: max abs probability difference {diff:.3g}. Expected <= {tolerance}")
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
    expected = np.argmax(restore_to_original(probabilities, case.meta, order=1, fill_value=background), axis=-1)
    signature = tf.saved_model.load(str(savedmodel)).signatures[SEGMENT_SIGNATURE]
    labels = signature(image=tf.constant(image), spacing_mm=tf.constant(spacing, tf.float64))["labels"].numpy()
    agreement = float((labels == expected).mean()) if labels.shape == expected.shape else 0.0
    if agreement < SEGMENT_AGREEMENT:
        raise BundleError(f"The exported {SEGMENT_SIGNATURE!r} signature disagrees with segment_volume: {agreement:.4%} "
                          f"equal labels (shape {labels.shape} vs {expected.shape}). Expected >= {SEGMENT_AGREEMENT:.1%}")
    return {"segment_label_agreement": agreement}


def _check_io(path: Path, found: tuple[Any, Any], expected: tuple[int, int]) -> None:
    found = tuple(int(v) if isinstance(v, (int, np.integer)) else v for v in found)
    if found != expected:
        raise BundleError(
            f"{path}: expected a network with {expected[0]} input channel(s) and {expected[1]} classes (from bundle.json). "
            f"Received: {found[0]} input channel(s), {found[1]} output channel(s)"
        )


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
