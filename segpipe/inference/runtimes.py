"""The runtimes that run a bundle's network: what each may do when loaded, how it is loaded and chosen.

==================  =====================  ======================  ===================================
format              file in the bundle     needs                   safe from an untrusted source?
==================  =====================  ======================  ===================================
``keras``           ``model.weights.h5``   TensorFlow              yes: the network is rebuilt by
                                                                   segpipe's builders from
                                                                   ``architecture``; only weight arrays
                                                                   are read (HDF5 checked first)
``onnx``            ``model.onnx``         ``segpipe[onnx]``       yes: standard ONNX operators only, no
                                                                   external data, no custom domains
``openvino``        ``openvino/model.xml`` ``segpipe[openvino]``   yes: an IR of OpenVINO's operator
                                                                   sets, read as IR only, weights from
                                                                   the bundle's ``model.bin``
``openvino-bf16``   the same file          ``segpipe[openvino]``   yes (bfloat16 compute: not float32
                                                                   exact)
``savedmodel``      ``savedmodel/``        TensorFlow              **no**: a SavedModel is a TensorFlow
                                                                   program; loading and calling it can
                                                                   run any op (read and write files)
==================  =====================  ======================  ===================================

A runtime with ``runs_code`` loads only with ``trust_bundle=True`` (``predict.py --trust-bundle``).
``format="auto"`` (:func:`choose_format`) takes the first of :data:`AUTO_ORDER` that the bundle
holds and whose runtime is installed: the measured speed of the default U-Net on the 2-core CPU
this project runs on (docs/inference.md), fastest first, among the runtimes that reproduce Keras
within float32 tolerance and cannot run code. ``openvino-bf16`` is faster still where the CPU has
bfloat16 units, but changes probabilities by ~1e-3, so it is only used when asked for by name.

OpenVINO compiles one static-shape model per input shape it sees (the sliding window always feeds
one shape), which is faster than its dynamic-shape path. Threads: ``threads=None`` leaves each
runtime's default (all cores).
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from segpipe.errors import Received, expected, first_line
from segpipe.inference.bundle import FILES, INPUT_NAME, SIGNATURE, Bundle, BundleError, read_bundle
from segpipe.inference.sliding_window import PredictFn, keras_predict_fn

# A runtime's loader: (model file, bundle, CPU threads or None) -> (predict_fn, (input channels, output channels))
Loader = Callable[[Path, Bundle, int | None], tuple[PredictFn, tuple[Any, Any]]]


@dataclass(frozen=True)
class Runtime:
    """One way to run a bundle's network."""

    name: str
    file: str  # path inside the bundle
    modules: tuple[str, ...]  # Python modules needed to run it
    extra: str | None  # pip extra that installs them (None: a core dependency)
    load: Loader  # loads the model file ``file`` of a bundle (called by load_predictor)
    exact: bool = True  # matches Keras within float32 tolerance
    runs_code: bool = False  # loading or calling it can run arbitrary operations (needs trust_bundle)


# The loaders are looked up when called (the functions are defined below, and tests may replace them).
RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        Runtime("keras", FILES["keras"], ("keras", "h5py"), None,
                load=lambda path, bundle, threads: load_keras(path, bundle.architecture)),
        Runtime("savedmodel", FILES["savedmodel"], ("tensorflow",), None, runs_code=True,
                load=lambda path, bundle, threads: load_savedmodel(path, SIGNATURE, INPUT_NAME)),
        Runtime("onnx", FILES["onnx"], ("onnxruntime", "onnx"), "onnx",
                load=lambda path, bundle, threads: load_onnx(path, threads)),
        Runtime("openvino", FILES["openvino"], ("openvino",), "openvino",
                load=lambda path, bundle, threads: load_openvino(path, precision="f32", threads=threads)),
        Runtime("openvino-bf16", FILES["openvino"], ("openvino",), "openvino", exact=False,
                load=lambda path, bundle, threads: load_openvino(path, precision="bf16", threads=threads)),
    )
}
# Fastest first among the float32-exact runtimes that cannot run code (docs/inference.md has the measurements).
AUTO_ORDER = ("openvino", "keras", "onnx")
# Tolerance for bfloat16 compute: max abs probability difference from Keras (bf16 has 8 mantissa bits).
BF16_TOLERANCE = 2e-2


def is_installed(name: str) -> bool:
    """Whether the Python modules of runtime ``name`` are importable (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in runtime(name).modules)


def runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ValueError(expected(f"one of {('auto', *RUNTIMES)}", key="format", received=name))
    return RUNTIMES[name]


def needs(name: str) -> str:
    """What runtime ``name`` needs, for an error: ``"openvino installed"``."""
    return f"{', '.join(runtime(name).modules)} installed"


def install_hint(name: str) -> str:
    """How to install runtime ``name``: ``Install the openvino extra: pip install "segpipe[openvino]".``"""
    extra = runtime(name).extra
    return f'Install the {extra} extra: pip install "segpipe[{extra}]".' if extra else "Install TensorFlow."


def file_format(name: str) -> str:
    """The bundle file format a runtime runs (``openvino-bf16`` -> ``openvino``)."""
    return "openvino" if runtime(name).name == "openvino-bf16" else name


def choose_format(available: Iterable[str], requested: str = "auto") -> str:
    """The runtime to use for a bundle holding the file formats ``available``.

    ``requested="auto"`` picks the first of :data:`AUTO_ORDER` (never a runtime that can run code)
    that is available and installed; a named runtime is returned if available and installed, else
    a clear error.

    Raises
    ------
    ValueError
        an unknown name, or a format the bundle does not hold.
    ImportError
        the named runtime is not installed.
    """
    available = set(available)
    if requested == "auto":
        for name in AUTO_ORDER:
            if name in available and is_installed(name):
                return name
        hint = ("Its SavedModel can run code: only for a bundle from a source you trust, use --format savedmodel "
                "--trust-bundle." if "savedmodel" in available else None)
        raise ValueError(expected(f"a bundle with at least one format whose runtime is installed (out of {AUTO_ORDER})",
                                  key="files", received=sorted(available), hint=hint))
    if file_format(requested) not in available:
        raise ValueError(expected(f"a bundle holding a {file_format(requested)!r} model for format={requested!r}",
                                  key="files", received=sorted(available)))
    if not is_installed(requested):
        raise ImportError(expected(f"{needs(requested)} to predict with it", key="format", received=requested,
                                   hint=install_hint(requested)))
    return requested


# ----------------------------------------------------------------------------------------------
# Loading a bundle's network


def load_predictor(bundle: Bundle | str | os.PathLike, format: str = "keras", *, threads: int | None = None,
                   trust_bundle: bool = False) -> PredictFn:
    """A ``predict_fn`` (float32 (B, X, Y, Z, Cin) -> probabilities (B, X, Y, Z, C)) from a bundle.

    Parameters
    ----------
    bundle
        A bundle or its folder (read and checked by :func:`segpipe.inference.bundle.read_bundle`).
    format
        A runtime name of :data:`RUNTIMES` or ``"auto"`` (:func:`choose_format`).
    threads
        CPU threads for ONNX Runtime and OpenVINO (``None``: their default, all cores).
    trust_bundle
        Allow a runtime that can run code (``savedmodel``): only for a bundle from a source you trust.

    Returns
    -------
    PredictFn
        With attributes ``format`` (the runtime used) and ``activation_bytes_per_voxel`` (from
        ``bundle.json``, for memory budgets).

    Raises
    ------
    BundleError
        A runtime that can run code without ``trust_bundle``; a model file that is missing,
        unreadable, outside what the format may hold, or does not match ``bundle.json``.
    ImportError
        The runtime is not installed.
    """
    bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    where = str(bundle.path / "bundle.json")
    if format != "auto" and runtime(format).runs_code and not trust_bundle:
        raise BundleError(expected(
            "a format that cannot run code (keras, onnx, openvino, auto) for a bundle not marked as trusted",
            key="format", received=format, where=where,
            hint=f"A {format} model is a program: loading it can read and write files. Only for a bundle from a "
                 "source you trust: pass --trust-bundle (trust_bundle=True)."))
    if format != "auto":
        bundle.file(file_format(format))  # a format the bundle lacks: the error says why it was not written
    format = choose_format(bundle.files, format)
    path = bundle.file(file_format(format))
    verification = bundle.meta.get("verification") or {}
    if format == "openvino-bf16" and verification.get("openvino-bf16_within_tolerance") is False:
        raise BundleError(expected(
            f"bfloat16 probabilities within {BF16_TOLERANCE} of Keras (checked at export)", key="format",
            received=format, where=where,
            hint=f"This network differs by {verification.get('openvino-bf16_max_abs_diff', float('nan')):.3g}; "
                 "use format='openvino' (float32)."))
    try:
        predict_fn, found = runtime(format).load(path, bundle, threads)
    except (ImportError, BundleError):
        raise
    except Exception as exc:  # a truncated or corrupt file: each runtime raises its own types
        raise BundleError(expected(f"a model file that loads with format={format!r}",
                                   key=f"files.{file_format(format)}",
                                   received=Received(f"{path} (cannot load: {first_line(exc)})"),
                                   where=where)) from exc
    _check_io(path, found, (bundle.input_channels, bundle.num_outputs),
              outputs="regions" if bundle.regions else "classes")
    predict_fn.format = format
    predict_fn.activation_bytes_per_voxel = bundle.meta.get("activation_bytes_per_voxel", 0)
    return predict_fn


def load_keras(path: Path, architecture: Mapping[str, Any] | None) -> tuple[PredictFn, tuple[Any, Any]]:
    """Rebuild the network from ``architecture`` with segpipe's builders and read its weight arrays from ``path``.

    Nothing of the file but arrays is used: no layer config is deserialised, so no Lambda, custom
    object or nested SavedModel can run. The HDF5 file is checked first (:func:`check_weights_file`).
    """
    net = load_keras_network(path, architecture)
    return keras_predict_fn(net), (net.inputs[0].shape[-1], net.outputs[0].shape[-1])


def load_keras_network(path: Path, architecture: Mapping[str, Any] | None):
    """The bundle's Keras network (full-resolution probabilities): built by segpipe's builders from
    ``architecture``, its weight arrays read from ``path`` after :func:`check_weights_file`."""
    from segpipe.models.architecture import build_network  # Keras: only when this runtime is used
    from segpipe.models.unet3d import probability_model  # Keras, as above

    if architecture is None:
        raise BundleError(expected("the network's architecture in bundle.json for Keras weights", key="architecture",
                                   received=None))
    net = probability_model(build_network(architecture))
    check_weights_file(path, expected_values=sum(math.prod(v.shape) for v in net.weights))
    net.load_weights(path)
    return net


# HDF5 filters a Keras weights file may use: deflate, shuffle, fletcher32, lzf (no plugin is ever loaded)
_H5_FILTERS = frozenset({1, 2, 3, 32000})


def check_weights_file(path: Path, *, expected_values: int) -> None:
    """Refuse an HDF5 weights file that holds more than plain numeric arrays of the expected total size.

    Refused: links to other objects or files (soft and external links), datasets stored in other
    files (external or virtual), non-numeric data (object references, strings), filters other
    than deflate/shuffle/fletcher32/lzf (an unknown one makes HDF5 look for a plugin library), and
    another number of values than the rebuilt network has (``expected_values``), before any array is read.
    """
    import h5py

    problems: list[str] = []
    total = 0

    def visit(group, prefix: str) -> None:
        nonlocal total
        for name in group:
            link = group.get(name, getlink=True)
            where = f"{prefix}/{name}"
            if not isinstance(link, h5py.HardLink):
                problems.append(f"{where} is a {type(link).__name__}")
                continue
            item = group[name]
            if isinstance(item, h5py.Group):
                visit(item, where)
                continue
            plist = item.id.get_create_plist()
            filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
            if item.is_virtual or plist.get_external_count():
                problems.append(f"{where} stores its data in another file")
            elif item.dtype.kind not in "biuf":
                problems.append(f"{where} holds {item.dtype} values, not numbers")
            elif filters - _H5_FILTERS:
                problems.append(f"{where} uses HDF5 filters {sorted(filters - _H5_FILTERS)}")
            total += int(item.size)

    with h5py.File(path, "r") as f:
        visit(f, "")
    if total != expected_values:
        problems.append(f"{total} values where the network has {expected_values}")
    if problems:
        raise BundleError(expected("a Keras weights file of plain numeric arrays", key="files.keras",
                                   received=Received(f"{path} ({problems[0]})")))


def load_savedmodel(path: Path, signature_name: str, input_name: str) -> tuple[PredictFn, tuple[Any, Any]]:
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures[signature_name]
    (input_spec,) = signature.structured_input_signature[1].values()
    ((output_name, output_spec),) = signature.structured_outputs.items()

    def predict_savedmodel(x: np.ndarray) -> np.ndarray:
        return signature(**{input_name: tf.constant(x, tf.float32)})[output_name].numpy()

    return predict_savedmodel, (input_spec.shape[-1], output_spec.shape[-1])


def load_onnx(path: Path, threads: int | None = None) -> tuple[PredictFn, tuple[Any, Any]]:
    if not is_installed("onnx"):
        raise ImportError(expected(f"{needs('onnx')} to predict with it", key="format", received="onnx",
                                   hint=install_hint("onnx")))
    import onnxruntime

    data = Path(path).read_bytes()  # read once: what is checked is what runs
    check_onnx_model(data, path)
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def predict_onnx(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return predict_onnx, (session.get_inputs()[0].shape[-1], session.get_outputs()[0].shape[-1])


def load_openvino(path: Path, *, precision: str = "f32",
                  threads: int | None = None) -> tuple[PredictFn, tuple[Any, Any]]:
    """An OpenVINO CPU predictor; ``precision`` ``"f32"`` (exact) or ``"bf16"`` (bfloat16 compute).

    OpenVINO's CPU plugin picks bfloat16 by itself on CPUs with AMX or AVX-512 BF16, so the
    precision is always set explicitly. One static-shape model is compiled per input shape.
    """
    if precision not in ("f32", "bf16"):
        raise ValueError(expected("'f32' or 'bf16'", key="precision", received=precision))
    if not is_installed("openvino"):
        raise ImportError(expected(f"{needs('openvino')} to predict with it", key="format", received="openvino",
                                   hint=install_hint("openvino")))
    import openvino

    check_openvino_ir(path)
    core = openvino.Core()
    model = core.read_model(str(path), str(Path(path).with_suffix(".bin")))
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled: dict[tuple[int, ...], Any] = {}

    def predict_openvino(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        request = compiled.get(x.shape)
        if request is None:
            if len(compiled) >= 4:  # a caller cycling through shapes: keep memory bounded
                compiled.clear()
            static = model.clone()
            static.reshape({static.inputs[0]: list(x.shape)})
            request = compiled[x.shape] = core.compile_model(static, "CPU", config).create_infer_request()
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()  # the request reuses its output buffer

    in_shape, out_shape = model.inputs[0].get_partial_shape(), model.outputs[0].get_partial_shape()
    channels = tuple(s[-1].get_length() if s[-1].is_static else None for s in (in_shape, out_shape))
    return predict_openvino, channels


ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})  # the standard operator sets; anything else is custom


def check_onnx_model(data: bytes, path: Path) -> None:
    """Refuse an ONNX model that reads other files (external data) or uses operators outside the standard set.

    Every graph is walked, subgraphs of control-flow nodes included; model-local functions are
    refused too (segpipe's export writes none).
    """
    import onnx

    model = onnx.load_from_string(data)
    problems: list[str] = []
    problems += [f"operator domain {o.domain!r}" for o in model.opset_import if o.domain not in ONNX_DOMAINS]
    if len(model.functions):
        problems.append(f"{len(model.functions)} model-local function(s)")

    def tensors_external(tensors) -> None:
        problems.extend(f"tensor {t.name!r} stored in an external file" for t in tensors
                        if t.data_location == onnx.TensorProto.EXTERNAL)

    def visit(graph) -> None:
        tensors_external(graph.initializer)
        tensors_external([s.values for s in graph.sparse_initializer])
        for node in graph.node:
            if node.domain not in ONNX_DOMAINS:
                problems.append(f"operator {node.domain}.{node.op_type}")
            for attr in node.attribute:
                tensors_external([attr.t, *attr.tensors])
                for sub in [attr.g, *attr.graphs]:
                    if sub.ByteSize():
                        visit(sub)

    visit(model.graph)
    if problems:
        raise BundleError(expected("an ONNX model of standard operators with its weights inside", key="files.onnx",
                                   received=Received(f"{path} ({problems[0]})")))


def check_openvino_ir(path: Path) -> None:
    """Refuse an ``openvino/model.xml`` that is not OpenVINO IR (``<net>``), or declares a DTD or entities.

    OpenVINO's reader picks a front end by the file's contents (ONNX, TensorFlow, PaddlePaddle...);
    only the IR is accepted here, with its weights read from ``model.bin`` beside it.
    """
    import xml.etree.ElementTree as ElementTree

    text = Path(path).read_bytes()
    head = text[:4096].lstrip()
    problem = None
    if b"<!DOCTYPE" in text or b"<!ENTITY" in text:
        problem = "a DTD or entity declaration"
    elif not head.startswith((b"<?xml", b"<net")):
        problem = "not an XML file"
    else:
        try:
            root = ElementTree.fromstring(text)
        except ElementTree.ParseError as exc:
            problem = f"invalid XML: {exc}"
        else:
            if root.tag != "net":
                problem = f"root element <{root.tag}>, not <net>"
    if problem:
        raise BundleError(expected("OpenVINO IR (an XML <net> without DTD)", key="files.openvino",
                                   received=Received(f"{path} ({problem})")))


def _check_io(path: Path, found: tuple[Any, Any], wanted: tuple[int, int], *, outputs: str = "classes") -> None:
    """The loaded network's input channels and output channels (``outputs``: classes, or regions) are bundle.json's."""
    found = tuple(int(v) if isinstance(v, (int, np.integer)) else v for v in found)
    if found != wanted:
        raise BundleError(expected(
            f"a network with {wanted[0]} input channel(s) and {wanted[1]} {outputs} (from bundle.json)", key="network",
            received=Received(f"{found[0]} input channel(s), {found[1]} output channel(s)"), where=str(path)))
