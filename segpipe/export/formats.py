"""Writing a network in each of a bundle's formats (the files that :mod:`segpipe.inference.runtimes` loads).

Each writer takes the single-output Keras network (:func:`segpipe.models.unet3d.probability_model`)
and the ``TensorSpec`` list of its input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from segpipe.data.preprocess import PreprocessSettings
from segpipe.export import serving_graph
from segpipe.inference.bundle import FILES, INPUT_NAME, SEGMENT_SIGNATURE, SIGNATURE
from segpipe.inference.settings import InferenceSettings


def write_model_files(net, folder: Path, *, keras_weights: bool, onnx: bool, openvino: bool, segment: bool,
                      not_written: dict[str, str], preprocessing: PreprocessSettings, patch_size: tuple[int, ...],
                      inference: InferenceSettings, regions_class_order: Sequence[int] | None = None
                      ) -> tuple[dict[str, str], list[str]]:
    """Every model file of the bundle into ``folder``; returns ``files`` (format -> path) and the SavedModel's
    signatures.

    ``regions_class_order``: a region network's label value per region, for the ``segment`` signature."""
    import tensorflow as tf

    in_channels = int(net.inputs[0].shape[-1])
    files = {"savedmodel": FILES["savedmodel"]}
    if keras_weights:  # the architecture is known: weights alone rebuild the network (no code in the file)
        net.save_weights(folder / FILES["keras"])
        files = {"keras": FILES["keras"], **files}
    signature = [tf.TensorSpec((None, None, None, None, in_channels), tf.float32, name=INPUT_NAME)]
    signatures = write_savedmodel(net, folder / FILES["savedmodel"], signature, segment=segment,
                                  not_written=not_written,
                                  preprocessing=preprocessing, patch_size=patch_size, inference=inference,
                                  regions_class_order=regions_class_order)
    if onnx:
        export_onnx(net, folder / FILES["onnx"], signature)
        files["onnx"] = FILES["onnx"]
    if openvino:
        export_openvino(net, folder / FILES["openvino"], signature)
        files["openvino"] = FILES["openvino"]
    return files, signatures


def write_savedmodel(net, path: Path, signature: list, *, segment: bool, not_written: dict[str, str],
                     preprocessing: PreprocessSettings, patch_size: tuple[int, ...], inference: InferenceSettings,
                     regions_class_order: Sequence[int] | None = None) -> list[str]:
    """The SavedModel: ``serving_default`` (windows) and, if possible, ``segment`` (raw scan -> labels).

    Written with ``tf.saved_model.save`` rather than ``keras.export.ExportArchive``: the archive traces
    every endpoint once to list its variables and the save traces it again (in its own context), and
    ``segment``'s graph takes seconds to trace. Here each signature is traced once, inside the save."""
    import tensorflow as tf

    root = tf.Module()
    root.network_variables = list(net.variables)  # what the signatures read, reachable for the saver
    signatures = {SIGNATURE: tf.function(lambda image: net(image, training=False), input_signature=signature,
                                         autograph=False)}
    reason = serving_graph.unsupported_reason(preprocessing) if segment else "segment=False"
    if reason is None:
        signatures[SEGMENT_SIGNATURE] = serving_graph.build_segment_function(
            net, preprocessing=preprocessing, patch_size=patch_size, overlap=inference.overlap,
            mirror_axes=inference.mirror_axes, batch_size=inference.batch_size, sigma_scale=inference.sigma_scale,
            in_channels=int(net.inputs[0].shape[-1]), regions_class_order=regions_class_order,
            largest_foreground=inference.postprocess_largest_foreground,
            largest_component=inference.postprocess_largest_component,
        )
    else:
        not_written[f"savedmodel:{SEGMENT_SIGNATURE}"] = reason
    tf.saved_model.save(root, str(path), signatures=signatures)
    return list(signatures)


def export_onnx(net, path: Path, input_signature: list) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # numpy 2 deprecations inside tf2onnx
        net.export(str(path), format="onnx", input_signature=input_signature, verbose=False)


def export_openvino(net, path: Path, input_signature: list) -> None:
    """OpenVINO IR (``model.xml`` + ``model.bin``, float32 weights) through Keras' exporter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    net.export(str(path), format="openvino", input_signature=input_signature, verbose=False)
