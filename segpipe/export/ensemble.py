"""One bundle from several trained runs (the folds of ``--folds K``, or runs you choose): an ensemble.

The members' networks become one Keras model (:func:`segpipe.models.architecture.build_network` with
``builder: ensemble``): each member's full-resolution probabilities, averaged. Every format of the
bundle (Keras weights, SavedModel and its ``segment`` signature, ONNX, OpenVINO) therefore holds the
whole ensemble, and prediction needs nothing new: the sliding window, mirroring and blending run
once on the averaged probabilities (averaging before mirroring equals averaging after: both are
means). ``bundle.json`` lists the members (their run, checkpoint and architecture) under
``members``, and the post-processing decided on out-of-fold predictions under ``postprocessing``.

Members must share classes, regions (and their class order), input channels, preprocessing and
patch size; the first difference is one clear error. Region members' sigmoid probabilities are
averaged like class probabilities, and the bundle carries their regions.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from segpipe.errors import Received, expected
from segpipe.export.bundle import write_bundle
from segpipe.export.run_export import RunMember, load_run_member
from segpipe.inference.settings import InferenceSettings
from segpipe.models.architecture import ENSEMBLE, MAX_MEMBERS, build_network, check_architecture
from segpipe.models.unet3d import probability_model


def export_ensemble(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    checkpoint: str = "best",
    inference: InferenceSettings | Mapping[str, Any] | None = None,
    postprocessing: Mapping[str, Any] | None = None,
    onnx: bool = False,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write one bundle holding the networks of ``run_dirs``, their probabilities averaged.

    Parameters
    ----------
    run_dirs
        2 to 16 trained run directories (e.g. ``runs/<name>_fold0`` ... ``_fold4``).
    out_dir
        The bundle folder (an existing one only with ``overwrite``, and only if segpipe wrote it).
    checkpoint
        ``best``, ``last``, ``final`` or a file, for every member.
    inference
        Inference settings; default: the first member's config.
    postprocessing
        A post-processing decision record (``segpipe.evaluation.postprocessing``); its
        ``postprocess_largest_component`` labels and ``postprocess_largest_foreground`` replace the
        inference settings' ones, and the record is stored in ``bundle.json``.
    onnx, overwrite, verify
        As for :func:`segpipe.export.bundle.write_bundle`.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ValueError
        Fewer than 2 or more than 16 members, or members that differ in classes, regions, channels,
        preprocessing or patch size (the first difference is named).
    """
    if not 2 <= len(run_dirs) <= MAX_MEMBERS:
        raise ValueError(expected(f"2 to {MAX_MEMBERS} run directories", key="run_dirs",
                                  received=[str(r) for r in run_dirs]))
    members = [load_run_member(r, checkpoint) for r in run_dirs]
    check_members_agree(members)
    first = members[0]
    spec = check_architecture({"builder": ENSEMBLE, "in_channels": first.architecture["in_channels"],
                               "num_classes": first.architecture["num_classes"],
                               "members": [m.architecture for m in members]})
    ensemble = build_network(spec)
    for k, member in enumerate(members):
        ensemble.get_layer(f"member_{k}").set_weights(probability_model(member.model).get_weights())
    settings = inference if inference is not None else first.config.inference
    settings = settings if isinstance(settings, InferenceSettings) else InferenceSettings.from_dict(settings or {})
    if postprocessing is not None:
        settings = dataclasses.replace(settings, postprocess_largest_component=tuple(
            int(v) for v in postprocessing.get("postprocess_largest_component", ())),
            postprocess_largest_foreground=bool(postprocessing.get("postprocess_largest_foreground", False)))
    extra = {"members": [{**m.source, "architecture": m.architecture} for m in members]}
    if postprocessing is not None:
        extra["postprocessing"] = dict(postprocessing)
    return write_bundle(
        ensemble, out_dir, class_names=first.class_names, preprocessing=first.preprocessing,
        patch_size=first.config.data.patch_size, channel_names=first.channel_names, architecture=spec,
        inference=settings, training_config=first.config.to_dict(), source={"ensemble_of": len(members)},
        extra_meta=extra, regions=first.regions, regions_class_order=first.regions_class_order,
        ignore_label=first.ignore_label, onnx=onnx, verify=verify, overwrite=overwrite,
    )


def check_members_agree(members: Sequence[RunMember]) -> None:
    """Raise a ValueError naming the first member and property that differs from the first member."""
    first = members[0]
    checks = (
        ("classes", lambda m: list(m.class_names)),
        ("regions", lambda m: [[g.name, list(g.values)] for g in m.regions or ()]),
        ("regions class order", lambda m: list(m.regions_class_order or ())),
        ("input channels", lambda m: m.architecture["in_channels"]),
        ("channel names", lambda m: list(m.channel_names or [])),
        ("preprocessing", lambda m: m.preprocessing.to_dict()),
        ("patch size", lambda m: list(m.config.data.patch_size)),
    )
    for member in members[1:]:
        for what, value in checks:
            if value(member) != value(first):
                raise ValueError(expected(
                    f"members that share {what} (the first member, {first.run_dir}, has {value(first)})",
                    key=f"members.{what.replace(' ', '_')}", received=Received(f"{member.run_dir}: {value(member)}")))
