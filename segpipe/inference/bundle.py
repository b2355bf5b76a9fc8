"""Reading a received bundle: ``bundle.json`` checked and bounded, every file checked against its manifest.

A bundle is untrusted input (someone sent it). :func:`read_bundle` reads nothing but
``bundle.json`` and the bytes of the files it lists, and refuses, with one error naming the file or
key:

- a ``bundle.json`` over :data:`MAX_BUNDLE_JSON_BYTES`, invalid, of another format or version;
- any number that would size an allocation beyond its bound: patch (:data:`MAX_PATCH_VOXELS`),
  windows per call (:data:`MAX_BATCH_SIZE`), target spacing (:data:`SPACING_RANGE_MM`), classes
  (:data:`segpipe.models.architecture.MAX_CLASSES`), channels, the network's size
  (:func:`segpipe.models.architecture.check_architecture`);
- a file that breaks the manifest (:mod:`segpipe.inference.integrity`): missing, changed, extra,
  executable, a symbolic link, or a path that leaves the folder;
- a model file under any name other than the fixed one of its format (:data:`FILES`);
- regions (``regions``, ``regions_class_order``, ``output_activation``) that are malformed, disagree
  with one another, with ``classes`` or with the network's outputs, and an ``ignore_label`` that is
  not a value above every class.

A region bundle (nnU-Net's region-based training, :mod:`segpipe.data.labels`) has one sigmoid output
per region (``output_activation: "sigmoid"``); prediction turns the region probabilities into labels
by ``regions_class_order``. ``classes`` names the label values of the label maps it writes.

Which formats may then be loaded without trusting the sender is :mod:`segpipe.inference.runtimes`'
business (docs/deployment.md, "Trust").

Layout (version 2)::

    BUNDLE/
      .segpipe           segpipe's marker (a folder segpipe created and may replace)
      bundle.json        classes, channels, preprocessing, orientation, patch size, inference
                         settings, regions (optional), the output activation, the network's
                         architecture (builder arguments), the file manifest (size and
                         SHA-256 of every file), versions, provenance
      model.weights.h5   the network's weight arrays (Keras); the network is rebuilt from
                         ``architecture`` with segpipe's own builders
      savedmodel/        TensorFlow SavedModel (``serving_default`` and ``segment`` signatures)
      model.onnx         optional
      openvino/          ``model.xml`` + ``model.bin``, OpenVINO IR (when openvino is installed)
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from segpipe.data.labels import MAX_LABEL, Region
from segpipe.data.preprocess import ORIENTATION, PreprocessSettings
from segpipe.errors import Received, SettingError, expected, first_line
from segpipe.inference import integrity
from segpipe.inference.settings import InferenceSettings
from segpipe.models.architecture import MAX_CHANNELS, MAX_CLASSES, check_architecture

BUNDLE_FORMAT = "segpipe-bundle"
BUNDLE_VERSION = 2  # 2: weights + architecture instead of a serialised model.keras, a file manifest
FORMATS = ("keras", "savedmodel", "onnx", "openvino")  # the model files a bundle can hold
FILES = {"keras": "model.weights.h5", "savedmodel": "savedmodel", "onnx": "model.onnx",
         "openvino": "openvino/model.xml"}  # each format's one allowed path
SIGNATURE = "serving_default"
SEGMENT_SIGNATURE = "segment"
INPUT_NAME = "image"
# Bounds on what bundle.json may claim (checked before anything is allocated)
MAX_BUNDLE_JSON_BYTES = 16 * 2**20
MAX_PATCH_SIDE = 1024
MAX_PATCH_VOXELS = 2**24  # 256³; the largest nnU-Net 3D patches are ~ 2·10⁶ voxels
MAX_BATCH_SIZE = 256
SPACING_RANGE_MM = (1e-3, 1e3)
MAX_ACTIVATION_BYTES_PER_VOXEL = 2**20
MAX_NAME_CHARS = 256  # a class or region name
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid")  # probabilities per class; one probability per region


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
    architecture: dict[str, Any] | None = None  # builder arguments; None: no Keras weights in the bundle
    training_config: dict[str, Any] = field(default_factory=dict, repr=False)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole bundle.json
    # region bundles: one sigmoid output per region, labels by regions_class_order (segpipe.data.labels)
    regions: tuple[Region, ...] | None = None
    regions_class_order: tuple[int, ...] | None = None
    ignore_label: int | None = None  # of the training data, for the record (prediction never writes it)

    @property
    def num_classes(self) -> int:
        """Label values of the label maps prediction writes (``classes``)."""
        return len(self.class_names)

    @property
    def num_outputs(self) -> int:
        """Output channels of the network: one per region, else one per class."""
        return len(self.regions) if self.regions else self.num_classes

    @property
    def output_names(self) -> tuple[str, ...]:
        """One name per output channel: the regions, else the classes."""
        return tuple(r.name for r in self.regions) if self.regions else self.class_names

    def file(self, fmt: str) -> Path:
        """Path of the model file of format ``fmt`` (``keras``, ``savedmodel``, ``onnx``, ``openvino``)."""
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


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read and validate a bundle folder (or its ``bundle.json``), files included.

    Parameters
    ----------
    path
        The bundle folder or its ``bundle.json``.

    Returns
    -------
    Bundle

    Raises
    ------
    BundleError
        The folder or ``bundle.json`` is missing, too large or invalid JSON, a key is missing or has
        a wrong type or an out-of-bounds value, the format version is not supported, or a file
        breaks the manifest. The message names the file or key.
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
    files = _read_files(fields)
    regions, regions_class_order, activation = _read_regions(fields, len(classes))
    ignore_label = _read_ignore_label(fields, len(classes))
    architecture = _read_architecture(fields, input_channels, len(regions) if regions else len(classes), files,
                                      activation)
    _read_bounded_number(fields, "activation_bytes_per_voxel", MAX_ACTIVATION_BYTES_PER_VOXEL)
    manifest = fields.get("manifest", dict, "a mapping file -> {bytes, sha256}")
    _check_files_in_manifest(fields, files, manifest)
    try:
        integrity.check_manifest(path, manifest)
    except integrity.IntegrityError as exc:
        raise BundleError(str(exc)) from None
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
        architecture=architecture,
        training_config=dict(meta.get("training_config") or {}),
        meta=meta,
        regions=regions,
        regions_class_order=regions_class_order,
        ignore_label=ignore_label,
    )


def _read_bundle_json(path: Path) -> tuple[Path, dict[str, Any]]:
    """The bundle folder and its parsed ``bundle.json`` (a JSON object of bounded size, not a link)."""
    if path.name == "bundle.json" and path.is_file():
        path = path.parent
    if not path.is_dir():
        raise BundleError(expected("a bundle folder", key="bundle", received=Received(f"{path} (no such folder)")))
    json_path = path / "bundle.json"
    if json_path.is_symlink():
        raise BundleError(expected("bundle.json as a plain file, not a symbolic link", key="bundle.json",
                                   received=Received(f"{json_path} -> {os.readlink(json_path)}")))
    if not json_path.is_file():
        raise BundleError(expected("bundle.json in the bundle folder (it is written last: without it the bundle is "
                                   "incomplete)", key="bundle.json", received=Received(f"{json_path} (no such file)")))
    size = json_path.stat().st_size
    if size > MAX_BUNDLE_JSON_BYTES:
        raise BundleError(expected(f"at most {MAX_BUNDLE_JSON_BYTES} bytes", key="bundle.json",
                                   received=Received(f"{size} bytes"), where=str(json_path)))
    try:
        meta = json.loads(json_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(expected("valid JSON", key="contents", received=Received(f"invalid JSON ({exc})"),
                                   where=str(json_path))) from None
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
        newer = ("Written by a newer segpipe: upgrade segpipe." if version > BUNDLE_VERSION else
                 "Version 1 bundles hold a serialised model.keras and no file manifest; re-export the run: "
                 "python predict.py export RUN_DIR --overwrite.")
        raise BundleError(expected(f"format version {BUNDLE_VERSION}", key="format_version", received=version,
                                   where=fields.where, hint=newer))


def _read_classes(fields: _BundleFields) -> list[dict[str, Any]]:
    classes = fields.get("classes", list, "a list of {'value': int, 'name': str}")
    if not 2 <= len(classes) <= MAX_CLASSES or any(
        not isinstance(c, dict) or c.get("value") != i or not isinstance(c.get("name"), str) 
        for i, c in enumerate(classes)
    ):
        raise BundleError(expected(f"2 to {MAX_CLASSES} entries {{'value': i, 'name': str}} with values 0, 1, 2, ... "
                                   "in order", key="classes", received=classes, where=fields.where))
    return classes


def _read_regions(fields: _BundleFields, num_classes: int
                  ) -> tuple[tuple[Region, ...] | None, tuple[int, ...] | None, str]:
    """``regions`` and ``regions_class_order`` (both or neither) and ``output_activation``.

    Absent (or null) ``regions``: a class network, ``output_activation`` ``softmax`` (the default).
    ``regions``: a list of ``{"name": str, "values": [int, ...]}`` (unique names, values 1..255),
    ``regions_class_order`` one class value (1 .. classes - 1) per region, ``output_activation``
    ``sigmoid``.
    """
    meta = fields.meta
    activation = meta.get("output_activation", "softmax")
    if activation not in OUTPUT_ACTIVATIONS:
        raise BundleError(expected(f"one of {list(OUTPUT_ACTIVATIONS)}", key="output_activation", received=activation,
                                   where=fields.where))
    raw, order = meta.get("regions"), meta.get("regions_class_order")
    if raw is None:
        if order is not None:
            raise BundleError(expected("null without regions", key="regions_class_order", received=order,
                                       where=fields.where))
        if activation != "softmax":
            raise BundleError(expected("'softmax' (a bundle without regions has one probability per class)",
                                       key="output_activation", received=activation, where=fields.where))
        return None, None, activation
    what = (f"a list of 1 to {MAX_CLASSES} regions {{'name': str, 'values': [int, ...]}} with unique names and "
            f"values from 1 to {MAX_LABEL}")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_CLASSES:
        raise BundleError(expected(what, key="regions", received=raw, where=fields.where))
    regions = []
    for k, entry in enumerate(raw):
        name, values = (entry.get("name"), entry.get("values")) if isinstance(entry, dict) else (None, None)
        if (not isinstance(entry, dict) or set(entry) != {"name", "values"} or not isinstance(name, str)
                or not 0 < len(name) <= MAX_NAME_CHARS or not isinstance(values, list)
                or not 1 <= len(values) <= MAX_LABEL
                or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_LABEL for v in values)):
            raise BundleError(expected(what, key=f"regions[{k}]", received=entry, where=fields.where))
        regions.append(Region(name, tuple(values)))
    names = [r.name for r in regions]
    if len(set(names)) != len(names):
        raise BundleError(expected(what, key="regions", received=Received(f"names {names}"), where=fields.where))
    order_what = f"one class value from 1 to {num_classes - 1} (a value of classes) per region ({len(regions)})"
    if (not isinstance(order, list) or len(order) != len(regions)
            or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < num_classes for v in order)):
        raise BundleError(expected(order_what, key="regions_class_order", received=order, where=fields.where))
    if activation != "sigmoid":
        raise BundleError(expected("'sigmoid' (a region bundle has one probability per region)",
                                   key="output_activation", received=activation, where=fields.where))
    return tuple(regions), tuple(int(v) for v in order), activation


def _read_ignore_label(fields: _BundleFields, num_classes: int) -> int | None:
    """``ignore_label`` (optional, for the record): a value above every class value, at most 255."""
    value = fields.meta.get("ignore_label")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not num_classes <= value <= MAX_LABEL:
        raise BundleError(expected(f"null or an integer from {num_classes} to {MAX_LABEL} (above every class value)",
                                   key="ignore_label", received=value, where=fields.where))
    return value


def _read_channels(fields: _BundleFields) -> tuple[int, list[Any]]:
    """``input_channels`` and ``channel_names`` (default ``channel_<i>``), one name per channel."""
    input_channels = fields.get("input_channels", int, "a positive integer")
    if not 1 <= input_channels <= MAX_CHANNELS:
        raise BundleError(expected(f"an integer from 1 to {MAX_CHANNELS}", key="input_channels",
                                   received=input_channels, where=fields.where))
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
        preprocessing = PreprocessSettings.from_dict(settings, where=fields.where, prefix="preprocessing.")
    except ValueError as exc:  # worded by PreprocessSettings.from_dict: the file, preprocessing.<key>, values
        raise BundleError(str(exc)) from None
    low, high = SPACING_RANGE_MM
    spacing = preprocessing.target_spacing_mm
    if spacing is not None and not all(low <= s <= high for s in spacing):
        raise BundleError(expected(f"3 voxel sizes from {low} to {high} mm (or null)",
                                   key="preprocessing.target_spacing_mm",
                                   received=list(spacing), where=fields.where))
    return preprocessing


def _read_patch_size(fields: _BundleFields) -> list[int]:
    what = f"3 integers from 1 to {MAX_PATCH_SIDE}, at most {MAX_PATCH_VOXELS} voxels in all"
    patch_size = fields.get("patch_size", list, what)
    if (len(patch_size) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_PATCH_SIDE
                                    for s in patch_size) or math.prod(patch_size) > MAX_PATCH_VOXELS):
        raise BundleError(expected(what, key="patch_size", received=patch_size, where=fields.where))
    return patch_size


def _read_inference(fields: _BundleFields) -> InferenceSettings:
    """``inference``, validated by :class:`InferenceSettings` (errors keyed ``inference.<key>``)."""
    settings = fields.get("inference", dict, "the inference settings")
    batch_size = settings.get("batch_size", 1)
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > MAX_BATCH_SIZE:
        raise BundleError(expected(f"an integer from 1 to {MAX_BATCH_SIZE}", key="inference.batch_size",
                                   received=batch_size, where=fields.where))
    try:
        return InferenceSettings.from_dict(settings, where=fields.where, prefix="inference.")
    except SettingError as exc:  # worded by InferenceSettings.from_dict: the file, inference.<key>, values
        raise BundleError(str(exc)) from None
    except (TypeError, ValueError) as exc:  # e.g. mirror_axes that is not a list
        raise BundleError(expected("the inference settings", key="inference", received=settings,
                                   where=fields.where, hint=first_line(exc))) from exc


def _read_files(fields: _BundleFields) -> dict[str, str]:
    """``files``: format -> the one path of that format (:data:`FILES`); its bytes are the manifest's business."""
    files = fields.get("files", dict, "a mapping format -> file")
    unknown = sorted(set(files) - set(FORMATS))
    if not files or unknown:
        raise BundleError(expected(f"formats among {list(FORMATS)}", key="files", received=sorted(files),
                                   where=fields.where))
    for fmt, name in files.items():
        if name != FILES[fmt]:
            raise BundleError(expected(f"{FILES[fmt]!r} (the one file name of the {fmt} format)", key=f"files.{fmt}",
                                       received=name, where=fields.where))
    return files


def _check_files_in_manifest(fields: _BundleFields, files: Mapping[str, str], manifest: Mapping[str, Any]) -> None:
    """Every model file ``files`` names is one the manifest lists (a folder format: its marker files)."""
    for fmt, name in files.items():
        needed = {"savedmodel": [f"{name}/saved_model.pb"],
                  "openvino": [name, name[: -len(".xml")] + ".bin"]}.get(fmt, [name])
        missing = [n for n in needed if n not in manifest]
        if missing:
            raise BundleError(expected("every model file bundle.json lists, in its manifest", key=f"files.{fmt}",
                                       received=Received(f"{name} ({missing[0]} is not in the manifest; incomplete "
                                                         "bundle?)"),
                                       where=fields.where))


def _read_architecture(fields: _BundleFields, input_channels: int, num_classes: int,
                       files: Mapping[str, str], activation: str = "softmax") -> dict[str, Any] | None:
    """``architecture`` (builder arguments), bounded; required with Keras weights, matching channels, outputs
    (``num_classes``: classes, or regions) and ``output_activation``."""
    if "keras" not in files:
        return None
    spec = fields.get("architecture", dict, "the network's builder and its arguments")
    try:
        spec = check_architecture(spec, where=fields.where)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    found = (spec["in_channels"], spec["num_classes"])
    outputs = "regions" if activation == "sigmoid" else "classes"
    if found != (input_channels, num_classes):
        raise BundleError(expected(f"{input_channels} input channel(s) and {num_classes} {outputs} (input_channels and "
                                   f"{outputs} of bundle.json)", key="architecture", where=fields.where,
                                   received=Received(f"in_channels={found[0]}, num_classes={found[1]}")))
    heads = {m.get("args", {}).get("output", "softmax") for m in spec.get("members", [spec])}
    if (activation == "sigmoid") != (heads == {"sigmoid"}):
        raise BundleError(expected(f"networks whose head matches output_activation {activation!r}",
                                   key="architecture", where=fields.where,
                                   received=Received(f"args.output={sorted(heads)}")))
    return spec


def _read_bounded_number(fields: _BundleFields, key: str, high: int) -> int:
    value = fields.get(key, int, f"an integer from 0 to {high}")
    if not 0 <= value <= high:
        raise BundleError(expected(f"an integer from 0 to {high}", key=key, received=value, where=fields.where))
    return value


def _warn_on_version_change(versions: Mapping[str, Any]) -> None:
    """Warn when the bundle's Keras major version differs (read without importing TensorFlow)."""
    written = str(versions.get("keras", ""))
    try:
        installed = importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        return
    if written and written.split(".")[0] != installed.split(".")[0]:
        warnings.warn(f"Bundle written with Keras {written}; this is Keras {installed}", stacklevel=3)
