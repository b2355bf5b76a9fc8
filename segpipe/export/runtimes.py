"""The runtimes that run a bundle's network, how each is exported, loaded and chosen.

==============  ==========================  ===========================  ============================
format          file in the bundle          needs                        notes
==============  ==========================  ===========================  ============================
``keras``       ``model.keras``             TensorFlow (always there)    the reference; ``predict_on_batch``
``savedmodel``  ``savedmodel/``             TensorFlow                   also holds the ``segment`` signature
``onnx``        ``model.onnx``              ``segpipe[onnx]``            ONNX Runtime, CPU provider
``openvino``    ``openvino/model.xml``      ``segpipe[openvino]``        OpenVINO CPU plugin, float32
``openvino-bf16`` the same file             ``segpipe[openvino]``        bfloat16 compute (AMX/AVX-512
                                                                         BF16 CPUs): not float32 exact
==============  ==========================  ===========================  ============================

``format="auto"`` (:func:`choose_format`) takes the first of :data:`AUTO_ORDER` that the bundle
holds and whose runtime is installed. The order is the measured speed of the default U-Net on the
2-core CPU this project runs on (docs/inference.md, benchmark table), fastest first, among the
runtimes that reproduce Keras within float32 tolerance (``VERIFY_TOLERANCE``); ``openvino-bf16``
is faster still where the CPU has bfloat16 units, but changes probabilities by ~1e-3, so it is
only used when asked for by name.

OpenVINO compiles one static-shape model per input shape it sees (the sliding window always feeds
one shape), which is faster than its dynamic-shape path. Threads: ``threads=None`` leaves each
runtime's default (all cores).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from segpipe.errors import expected
from segpipe.inference.sliding_window import PredictFn, keras_predict_fn


@dataclass(frozen=True)
class Runtime:
    """One way to run a bundle's network."""

    name: str
    file: str  # path inside the bundle
    modules: tuple[str, ...]  # Python modules needed to run it
    extra: str | None  # pip extra that installs them (None: a core dependency)
    exact: bool = True  # matches Keras within float32 tolerance


RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        Runtime("keras", "model.keras", ("keras",), None),
        Runtime("savedmodel", "savedmodel", ("tensorflow",), None),
        Runtime("onnx", "model.onnx", ("onnxruntime",), "onnx"),
        Runtime("openvino", "openvino/model.xml", ("openvino",), "openvino"),
        Runtime("openvino-bf16", "openvino/model.xml", ("openvino",), "openvino", exact=False),
    )
}
# Fastest first among the float32-exact runtimes (docs/inference.md has the measurements).
AUTO_ORDER = ("openvino", "savedmodel", "keras", "onnx")
# The model files a bundle can hold (openvino-bf16 runs the openvino file).
FILE_FORMATS = ("keras", "savedmodel", "onnx", "openvino")
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

    ``requested="auto"`` picks the first of :data:`AUTO_ORDER` that is available and installed;
    a named runtime is returned if available and installed, else a clear error.

    Raises:
        ValueError: an unknown name, or a format the bundle does not hold.
        ImportError: the named runtime is not installed.
    """
    available = set(available)
    if requested == "auto":
        for name in AUTO_ORDER:
            if name in available and is_installed(name):
                return name
        raise ValueError(expected(f"a bundle with at least one format whose runtime is installed (out of {AUTO_ORDER})",
                                  key="files", received=sorted(available)))
    if file_format(requested) not in available:
        raise ValueError(expected(f"a bundle holding a {file_format(requested)!r} model for format={requested!r}",
                                  key="files", received=sorted(available)))
    if not is_installed(requested):
        raise ImportError(expected(f"{needs(requested)} to predict with it", key="format", received=requested,
                                   hint=install_hint(requested)))
    return requested


# ----------------------------------------------------------------------------------------------
# Export (each takes the single-output Keras model and the TensorSpec list of its input)


def export_onnx(net, path: Path, input_signature: list) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # numpy 2 deprecations inside tf2onnx
        net.export(str(path), format="onnx", input_signature=input_signature, verbose=False)


def export_openvino(net, path: Path, input_signature: list) -> None:
    """OpenVINO IR (``model.xml`` + ``model.bin``, float32 weights) through Keras' exporter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    net.export(str(path), format="openvino", input_signature=input_signature, verbose=False)


# ----------------------------------------------------------------------------------------------
# Loading: each returns (predict_fn, (input channels, output channels)) or raises


def load_keras(path: Path) -> tuple[PredictFn, tuple[Any, Any]]:
    import keras

    model = keras.models.load_model(path, compile=False, safe_mode=True)
    return keras_predict_fn(model), (model.inputs[0].shape[-1], model.outputs[0].shape[-1])


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

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def predict_onnx(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return predict_onnx, (session.get_inputs()[0].shape[-1], session.get_outputs()[0].shape[-1])


def load_openvino(path: Path, *, precision: str = "f32", threads: int | None = None) -> tuple[PredictFn, tuple[Any, Any]]:
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

    core = openvino.Core()
    model = core.read_model(str(path))
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
