"""Writing a deployable bundle from a trained model (the layout: :mod:`segpipe.inference.bundle`; from a run:
:mod:`segpipe.export.run_export`).

A bundle is a folder with everything prediction on a new scan needs and nothing from the training
run (no run directory, no dataset): ``bundle.json``, the network's weights (``model.weights.h5``,
with its architecture as segpipe builder arguments in ``bundle.json``), a SavedModel with the
``segment`` signature, and optionally ONNX and OpenVINO files (:mod:`segpipe.export.formats`).

The folder is written under a temporary name, flushed and renamed into place, and ``bundle.json``
is written last, so a crash never leaves a bundle that looks complete. ``bundle.json`` holds the
manifest (size and SHA-256 of every file, :mod:`segpipe.inference.integrity`) that a reader checks
before loading anything, and segpipe's marker (:mod:`segpipe.ownership`) says the folder may be
replaced by a later export. After writing, every format is loaded back and checked against the Keras
model (:mod:`segpipe.export.verify`); the differences are recorded under ``verification``. The
check is never skipped silently: a format whose runtime is missing is either an error (asked for)
or not written, and ``bundle.json`` says which under ``formats_not_written``.

Reading a bundle and loading its network is :mod:`segpipe.inference`'s (``bundle``, ``runtimes``).
"""
from __future__ import annotations

import datetime
import importlib.util
import math
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import segpipe
from segpipe.data.labels import MAX_LABEL, Region
from segpipe.data.preprocess import ORIENTATION, PreprocessSettings
from segpipe.errors import Received, expected
from segpipe.export.formats import write_model_files
from segpipe.export.verify import verify_formats, verify_segment
from segpipe.inference import runtimes
from segpipe.inference.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, FILES, INPUT_NAME, SEGMENT_SIGNATURE, SIGNATURE
from segpipe.inference.integrity import file_manifest
from segpipe.inference.settings import InferenceSettings
from segpipe.io import durable_replace, process_alive, write_json
from segpipe.models.architecture import check_architecture
from segpipe.ownership import check_replaceable, write_marker


def inference_model(model):
    """The network with one output, the full-resolution probabilities, as a plain functional Keras model.

    A deep-supervision model lists its full-resolution output first; the lower heads only serve the
    training loss. A logits head (``model.output: logits``) gets a softmax, so every export format
    returns probabilities. A network trained in a mixed precision is first copied with float32 layers
    and the same weights (:func:`segpipe.models.precision.float32_model`: tf2onnx and OpenVINO refuse
    bfloat16 graphs, and a bundle must not depend on the training hardware's 16-bit units); a float32
    result shares the layers (and weights) of ``model`` (:func:`segpipe.models.unet3d.probability_model`).
    """
    from segpipe.models.precision import float32_model  # loads Keras: only when writing a bundle
    from segpipe.models.unet3d import probability_model  # as above

    return probability_model(float32_model(model))


def activation_bytes_per_voxel(net, window: Sequence[int]) -> int:
    """Float32 bytes of all layer outputs of one forward pass per window voxel (shapes only, nothing runs).

    An upper bound of a forward pass's working memory (runtimes free most feature maps as they go),
    for :func:`segpipe.inference.sliding_window.batch_size_for_memory`; recorded in ``bundle.json``.
    """

    window = tuple(int(w) for w in window)
    return int(math.ceil(_activation_bytes(net, window) / math.prod(window)))


def _activation_bytes(net, window: tuple[int, ...]) -> int:
    """Float32 bytes of all layer outputs of ``net`` for one window; nested models (ensemble members) counted
    by their own layers (they may run side by side, so they add up)."""
    import keras

    nested = [layer for layer in net.layers[1:] if isinstance(layer, keras.Model)]
    plain = [layer.output for layer in net.layers[1:] if not isinstance(layer, keras.Model)]
    total = sum(_activation_bytes(model, window) for model in nested)
    if plain:
        probe = keras.Model(net.inputs, plain)
        specs = probe.compute_output_spec(keras.KerasTensor((1, *window, int(net.inputs[0].shape[-1]))))
        total += sum(4 * math.prod(int(d) for d in spec.shape[1:]) for spec in keras.tree.flatten(specs))
    return total


def write_bundle(
    model,
    out_dir: str | os.PathLike,
    *,
    class_names: Sequence[str],
    preprocessing: PreprocessSettings,
    patch_size: Sequence[int],
    channel_names: Sequence[str] | None = None,
    architecture: Mapping[str, Any] | None = None,
    inference: InferenceSettings | Mapping[str, Any] | None = None,
    training_config: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    regions: Sequence[Region] | None = None,
    regions_class_order: Sequence[int] | None = None,
    ignore_label: int | None = None,
    onnx: bool = False,
    openvino: bool | None = None,
    segment: bool = True,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a bundle for ``model`` (a trained segpipe U-Net, deep supervision or not) to ``out_dir``.

    Parameters
    ----------
    model
        the trained Keras model (softmax output(s), channels-last input).
    out_dir
        the bundle folder to create.
    class_names
        names indexed by label value; one per output channel (with ``regions``: one per
        label value of the label maps, 0 up to the largest of ``regions_class_order``).
    preprocessing
        the resolved preprocessing of training (target spacing, normalisation
        statistics); new scans go through exactly this.
    patch_size
        the training patch size, used as the sliding window.
    channel_names
        names of the input channels (defaults to ``channel_<i>``).
    architecture
        the builder arguments that build ``model``
        (:func:`segpipe.models.architecture.architecture_from_model_config`); with them the
        bundle holds Keras weights that load without running code. ``None`` (a network not
        built by segpipe's builders): no Keras weights, recorded under ``formats_not_written``.
    inference
        default inference settings stored in the bundle.
    training_config
        the run's resolved config (stored for provenance).
    source
        free-form provenance (run directory, checkpoint).
    extra_meta
        more keys for ``bundle.json`` (an ensemble's ``members`` and ``postprocessing``).
    regions
        a region network's regions (:class:`segpipe.data.labels.Region`), one sigmoid output
        each; stored as ``regions`` with ``output_activation: "sigmoid"``.
    regions_class_order
        with ``regions``: the label value written for each region.
    ignore_label
        the training data's ignore label, stored for the record.
    onnx
        also write ``model.onnx`` (needs tf2onnx, and onnxruntime for the check).
    openvino
        write ``openvino/model.xml``: ``None`` (default) when ``openvino`` is installed
        (otherwise ``bundle.json`` records under ``formats_not_written`` why not), ``True``
        insists (error without it), ``False`` never.
    segment
        add the ``segment`` signature (raw scan -> labels, :mod:`segpipe.export.serving_graph`)
        to the SavedModel; settings it cannot reproduce leave it out, recorded like a format.
    verify
        load every exported format back and check it against Keras (``bundle.json``
        records ``verification``; ``False`` records that it was not run).
    overwrite
        replace an existing ``out_dir`` that segpipe wrote (its marker); any other folder
        is never replaced.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    FileExistsError
        ``out_dir`` exists and ``overwrite`` is false, or it is not a bundle segpipe wrote.
    ImportError
        ``onnx=True`` without tf2onnx/onnxruntime, or ``openvino=True`` without openvino.
    BundleError
        an exported format disagrees with Keras by more than ``VERIFY_TOLERANCE``.
    """
    out_dir = Path(out_dir)
    openvino, not_written = _export_formats(out_dir, onnx=onnx, openvino=openvino, verify=verify, overwrite=overwrite)
    inference, patch_size = _checked_settings(preprocessing, inference, patch_size)
    net = inference_model(model)
    regions, regions_class_order = _checked_regions(net, regions, regions_class_order)
    class_names, channel_names = _checked_names(net, class_names, channel_names, regions_class_order)
    inference.check_classes(len(class_names))
    architecture = _checked_architecture(net, architecture, not_written)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    remove_orphaned_bundle_folders(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_marker(tmp, "bundle")
        files, signatures = write_model_files(net, tmp, keras_weights=architecture is not None, onnx=onnx,
                                              openvino=openvino, segment=segment, not_written=not_written,
                                              preprocessing=preprocessing, patch_size=patch_size, inference=inference,
                                              regions_class_order=regions_class_order)
        meta = _bundle_meta(net, class_names=class_names, channel_names=channel_names, preprocessing=preprocessing,
                            patch_size=patch_size, inference=inference, files=files, not_written=not_written,
                            signatures=signatures, onnx=onnx, openvino=openvino, source=source,
                            training_config=training_config, architecture=architecture, regions=regions,
                            regions_class_order=regions_class_order, ignore_label=ignore_label)
        meta["verification"] = verify_formats(net, tmp, files, patch_size, architecture) if verify else {"run": False}
        if verify and SEGMENT_SIGNATURE in signatures:
            meta["verification"].update(verify_segment(net, tmp / FILES["savedmodel"], preprocessing, patch_size,
                                                       inference, regions_class_order=regions_class_order))
        meta.update(extra_meta or {})
        meta["manifest"] = file_manifest(tmp)
        write_json(tmp / "bundle.json", meta)  # last: its presence marks the bundle complete
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _checked_architecture(net, architecture: Mapping[str, Any] | None,
                          not_written: dict[str, str]) -> dict[str, Any] | None:
    """The checked builder arguments of ``net`` (matching its channels and classes), or None, recorded."""
    if architecture is None:
        not_written["keras"] = ("no architecture given: the network was not described by segpipe's builder arguments, "
                                "so its Keras weights could not be loaded without running code")
        return None
    architecture = check_architecture(architecture)
    found = (int(net.inputs[0].shape[-1]), int(net.outputs[0].shape[-1]))
    if (architecture["in_channels"], architecture["num_classes"]) != found:
        raise ValueError(expected(f"the model's {found[0]} input channel(s) and {found[1]} classes", key="architecture",
                                  received=Received(f"in_channels={architecture['in_channels']}, "
                                                    f"num_classes={architecture['num_classes']}")))
    return architecture


def _export_formats(out_dir: Path, *, onnx: bool, openvino: bool | None, verify: bool,
                    overwrite: bool) -> tuple[bool, dict[str, str]]:
    """Whether to write OpenVINO, and the formats not written with why; fails before any work."""
    if out_dir.exists() and not overwrite:
        raise FileExistsError(expected("a new bundle folder", key="out_dir", received=Received(f"{out_dir} (exists)"),
                                       hint="Use overwrite=True (--overwrite) or another folder."))
    check_replaceable(out_dir, "bundle", key="out_dir")
    if onnx and (importlib.util.find_spec("tf2onnx") is None or not runtimes.is_installed("onnx")):
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
    inference = (inference if isinstance(inference, InferenceSettings)
                 else InferenceSettings.from_dict(inference or {}))
    patch_size = tuple(int(s) for s in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(expected("3 positive sizes", key="patch_size", received=list(patch_size)))
    return inference, patch_size


def _checked_regions(net, regions: Sequence[Region] | None, regions_class_order: Sequence[int] | None
                     ) -> tuple[tuple[Region, ...] | None, tuple[int, ...] | None]:
    """Regions (one per sigmoid output) with their class order, both or neither; a sigmoid head needs them."""
    from segpipe.models.unet3d import outputs_sigmoid  # Keras: writing a bundle loads it anyway

    outputs = int(net.outputs[0].shape[-1])
    if not regions:
        if regions_class_order is not None:
            raise ValueError(expected("regions with regions_class_order", key="regions", received=regions))
        if outputs_sigmoid(net):
            raise ValueError(expected("the regions of a sigmoid (region) network, one per output channel",
                                      key="regions", received=regions))
        return None, None
    regions = tuple(regions)
    if (len(regions) != outputs or not all(isinstance(g, Region) for g in regions)
            or len({g.name for g in regions}) != len(regions)):
        raise ValueError(expected(f"one Region per model output channel ({outputs}), unique names", key="regions",
                                  received=Received(repr(regions))))
    order = tuple(int(v) for v in regions_class_order or ())
    if len(order) != outputs or not all(1 <= v <= MAX_LABEL for v in order):
        raise ValueError(expected(f"one label value in 1..{MAX_LABEL} per region ({outputs})",
                                  key="regions_class_order",
                                  received=regions_class_order))
    return regions, order


def _checked_names(net, class_names: Sequence[str], channel_names: Sequence[str] | None,
                   regions_class_order: Sequence[int] | None = None) -> tuple[list[str], list[str]]:
    """Class names (one per output channel; with regions one per label value up to the largest of
    ``regions_class_order``) and channel names (one per input channel, default ``channel_<i>``)."""
    in_channels, num_classes = int(net.inputs[0].shape[-1]), int(net.outputs[0].shape[-1])
    class_names = [str(n) for n in class_names]
    if regions_class_order is not None:
        if len(class_names) <= max(regions_class_order):
            raise ValueError(expected(f"a name for every label value 0..{max(regions_class_order)} "
                                      "(regions_class_order)",
                                      key="class_names", received=class_names))
    elif len(class_names) != num_classes:
        raise ValueError(expected(f"one class name per model output channel ({num_classes})", key="class_names",
                                  received=class_names))
    channel_names = [str(n) for n in channel_names] if channel_names else [f"channel_{i}" for i in range(in_channels)]
    if len(channel_names) != in_channels:
        raise ValueError(expected(f"one channel name per model input channel ({in_channels})", key="channel_names",
                                  received=channel_names))
    return class_names, channel_names


def _bundle_meta(net, *, class_names: list[str], channel_names: list[str], preprocessing: PreprocessSettings,
                 patch_size: tuple[int, ...], inference: InferenceSettings, files: dict[str, str],
                 not_written: dict[str, str], signatures: list[str], onnx: bool, openvino: bool,
                 source: Mapping[str, Any] | None, training_config: Mapping[str, Any] | None,
                 architecture: Mapping[str, Any] | None, regions: Sequence[Region] | None = None,
                 regions_class_order: Sequence[int] | None = None, ignore_label: int | None = None) -> dict[str, Any]:
    """The contents of ``bundle.json`` (without ``verification`` and ``manifest``)."""
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
        "output_activation": "sigmoid" if regions else "softmax",
        "regions": [{"name": g.name, "values": list(g.values)} for g in regions] if regions else None,
        "regions_class_order": list(regions_class_order) if regions else None,
        "ignore_label": ignore_label,
        "architecture": dict(architecture) if architecture is not None else None,
        "formats_not_written": not_written,
        "signature": {"name": SIGNATURE, "input": INPUT_NAME},
        "signatures": signatures,
        "activation_bytes_per_voxel": activation_bytes_per_voxel(net, patch_size),
        "versions": _versions(onnx, openvino),
        "source": dict(source or {}),
        "training_config": dict(training_config or {}),
    }


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


def remove_orphaned_bundle_folders(out_dir: Path) -> list[Path]:
    """Delete ``.NAME.tmp-<pid>`` / ``.NAME.old-<pid>`` beside ``out_dir`` left by an export that was killed
    (its process no longer runs); a running export's folders are kept. Returns the folders removed."""
    removed = []
    for path in out_dir.parent.glob(f".{out_dir.name}.*-*") if out_dir.parent.is_dir() else []:
        kind, _, pid = path.name[len(out_dir.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and path.is_dir() and not path.is_symlink() \
                and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` folder onto ``out_dir``; an old bundle is removed only afterwards."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        durable_replace(out_dir, old)
    durable_replace(tmp, out_dir)  # flushes every file of the new bundle, then the rename
    shutil.rmtree(old, ignore_errors=True)


