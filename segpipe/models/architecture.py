"""A network described by data: the builder's name and its arguments, checked and bounded.

The architecture of a trained segpipe network is fully described by the arguments of its builder
(:func:`segpipe.models.unet3d.build_unet3d` or :func:`segpipe.models.resenc_unet.build_resenc_unet`).
Training builds its network from this description, and a bundle stores it in ``bundle.json``, so
loading a received bundle rebuilds the network with segpipe's own code and reads nothing from the
bundle but weight arrays: no deserialised layer config, no Lambda, no custom object can run.

Because the description may come from an untrusted file, :func:`check_architecture` bounds every
number before anything is built (a network of 10⁹ parameters would allocate gigabytes), and
accepts only the keys and values the builders know.

Examples
--------
>>> spec = {"builder": "unet3d", "in_channels": 1, "num_classes": 3, "args": {"depth": 3, "base_filters": 4}}
>>> check_architecture(spec)["args"]["depth"]
3
>>> estimated_parameters(check_architecture(spec)) < 100_000
True
"""
from __future__ import annotations

from typing import Any, Mapping

from segpipe.errors import Received, SettingError, expected

BUILDERS = ("unet3d", "resenc_unet")
ENSEMBLE = "ensemble"  # several networks of the builders above, their probabilities averaged
MAX_MEMBERS = 16
NORMS = ("batch", "instance", "none")  # the builders' own lists, restated so this module needs no Keras
INITS = ("glorot_uniform", "he_normal")
OUTPUTS = ("softmax", "logits", "sigmoid")
# Bounds for a description read from a file: generous for real networks (nnU-Net's largest 3D
# presets have 6-7 stages, 320 features, ~100 M parameters), small enough that building one is safe.
MAX_DEPTH = 8
MAX_FEATURES = 1024
MAX_CHANNELS = 64
MAX_CLASSES = 256  # label maps are uint8
MAX_CONVS = 8
MAX_PARAMETERS = 300_000_000

_INT_ARGS = {"depth": (1, MAX_DEPTH), "base_filters": (1, MAX_FEATURES), "max_filters": (1, MAX_FEATURES),
             "convs_per_stage": (1, MAX_CONVS), "decoder_convs": (1, MAX_CONVS)}
_CHOICE_ARGS = {"norm": NORMS, "init": INITS, "output": OUTPUTS}
_TRIPLE_ARGS = {"strides": (1, 2), "kernel_sizes": (1, 3, 5)}
_LIST_ARGS = {"features": (1, MAX_FEATURES), "blocks_per_stage": (1, MAX_CONVS)}
_BOOL_ARGS = ("deep_supervision",)


def architecture_from_model_config(model_config: Any, *, in_channels: int, num_classes: int,
                                   output: str | None = None) -> dict[str, Any]:
    """The description of the network a ``model`` config section builds (see
    :class:`segpipe.config.schema.ModelConfig`).

    Parameters
    ----------
    model_config
        The ``model`` section (``name``, ``depth``, ``base_filters``, ...).
    in_channels, num_classes
        Input channels and output classes (or regions) of the network.
    output
        The head, if not the config's ``model.output`` (``sigmoid`` for region training).

    Returns
    -------
    dict
        ``{"builder", "in_channels", "num_classes", "args"}``, checked by :func:`check_architecture`.
    """
    m = model_config
    args: dict[str, Any] = dict(depth=m.depth, base_filters=m.base_filters, max_filters=m.max_filters, norm=m.norm,
                                deep_supervision=m.deep_supervision, output=output or m.output, strides=m.strides,
                                kernel_sizes=m.kernel_sizes)
    if m.init is not None:
        args["init"] = m.init
    if m.name == "resenc_unet":
        args["blocks_per_stage"] = m.blocks_per_stage
    else:
        args["convs_per_stage"] = m.convs_per_stage
    return check_architecture({"builder": "resenc_unet" if m.name == "resenc_unet" else "unet3d",
                               "in_channels": in_channels, "num_classes": num_classes,
                               "args": {k: v for k, v in args.items() if v is not None}})


def check_architecture(spec: Any, *, where: str | None = None) -> dict[str, Any]:
    """``spec`` checked and normalised (plain ints, lists); every number bounded, unknown keys refused.

    Parameters
    ----------
    spec
        ``{"builder": "unet3d" | "resenc_unet", "in_channels": int, "num_classes": int, "args": {...}}``
        where ``args`` are keyword arguments of the builder.
    where
        The file the description came from, for the error message.

    Returns
    -------
    dict
        The normalised description.

    Raises
    ------
    ValueError
        Naming the key (``architecture.args.depth``), what was expected and what was received.
    """
    def _expected(key: str, what: str, received: Any) -> str:
        return expected(what, key=f"architecture.{key}", received=received, where=where)

    if isinstance(spec, Mapping) and spec.get("builder") == ENSEMBLE:
        return _check_ensemble(spec, where, _expected)
    if not isinstance(spec, Mapping):
        raise ValueError(_expected("", "a mapping with builder, in_channels, num_classes and args",
                                   Received(type(spec).__name__)))
    unknown = sorted(set(spec) - {"builder", "in_channels", "num_classes", "args"})
    if unknown:
        raise ValueError(_expected(unknown[0], "only the keys builder, in_channels, num_classes, args", sorted(spec)))
    if spec.get("builder") not in BUILDERS:
        raise ValueError(_expected("builder", f"one of {list(BUILDERS)}", spec.get("builder")))
    out: dict[str, Any] = {"builder": spec["builder"],
                           "in_channels": _bounded_int(spec.get("in_channels"), 1, MAX_CHANNELS, "in_channels",
                                                       _expected),
                           "num_classes": _bounded_int(spec.get("num_classes"), 1, MAX_CLASSES, "num_classes",
                                                       _expected)}
    args = spec.get("args")
    if not isinstance(args, Mapping):
        raise ValueError(_expected("args", "a mapping of builder arguments", Received(type(args).__name__)))
    allowed = {*_INT_ARGS, *_CHOICE_ARGS, *_TRIPLE_ARGS, *_LIST_ARGS, *_BOOL_ARGS}
    allowed -= {"convs_per_stage"} if out["builder"] == "resenc_unet" else {"blocks_per_stage"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(_expected(f"args.{unknown[0]}", f"arguments of {out['builder']} among {sorted(allowed)}",
                                   unknown[0]))
    checked: dict[str, Any] = {}
    for key, value in args.items():
        name = f"args.{key}"
        if key in _INT_ARGS:
            checked[key] = _bounded_int(value, *_INT_ARGS[key], name, _expected)
        elif key in _CHOICE_ARGS:
            if value not in _CHOICE_ARGS[key]:
                raise ValueError(_expected(name, f"one of {list(_CHOICE_ARGS[key])}", value))
            checked[key] = value
        elif key in _BOOL_ARGS:
            if not isinstance(value, bool):
                raise ValueError(_expected(name, "true or false", value))
            checked[key] = value
        elif key in _LIST_ARGS:
            low, high = _LIST_ARGS[key]
            if not isinstance(value, (list, tuple)) or len(value) > MAX_DEPTH:
                raise ValueError(_expected(name, f"a list of at most {MAX_DEPTH} integers", value))
            checked[key] = [_bounded_int(v, low, high, name, _expected) for v in value]
        else:
            allowed_values = _TRIPLE_ARGS[key]
            if (not isinstance(value, (list, tuple)) or len(value) > MAX_DEPTH
                    or not all(isinstance(t, (list, tuple)) and len(t) == 3 for t in value)):
                raise ValueError(_expected(name, f"a list of at most {MAX_DEPTH} triples", value))
            if any(isinstance(v, bool) or v not in allowed_values for t in value for v in t):
                raise ValueError(_expected(name, f"triples of values in {list(allowed_values)}", value))
            checked[key] = [[int(v) for v in t] for t in value]
    out["args"] = checked
    if out["num_classes"] < 2 and checked.get("output") != "sigmoid":  # one region: one sigmoid; else background + 1
        raise ValueError(_expected("num_classes", "an integer from 2 (1 only with args.output: sigmoid, one region)",
                                   out["num_classes"]))
    parameters = estimated_parameters(out)
    if parameters > MAX_PARAMETERS:
        raise ValueError(_expected("args", f"a network of at most {MAX_PARAMETERS:,} parameters",
                   Received(f"about {parameters:,} parameters")))
    return out


def _check_ensemble(spec: Mapping[str, Any], where: str | None, _expected) -> dict[str, Any]:
    """An ensemble: 2 to :data:`MAX_MEMBERS` single networks with the same channels and classes."""
    unknown = sorted(set(spec) - {"builder", "in_channels", "num_classes", "members"})
    if unknown:
        raise ValueError(_expected(unknown[0], "only the keys builder, in_channels, num_classes, members",
                                   sorted(spec)))
    members = spec.get("members")
    if not isinstance(members, list) or not 2 <= len(members) <= MAX_MEMBERS:
        raise ValueError(_expected("members", f"a list of 2 to {MAX_MEMBERS} networks",
                                   Received(f"{type(members).__name__} of "
                                            f"{len(members) if isinstance(members, list) else '?'}")))
    out = {"builder": ENSEMBLE,
           "in_channels": _bounded_int(spec.get("in_channels"), 1, MAX_CHANNELS, "in_channels", _expected),
           "num_classes": _bounded_int(spec.get("num_classes"), 1, MAX_CLASSES, "num_classes", _expected)}
    checked = []
    for k, member in enumerate(members):
        if isinstance(member, Mapping) and member.get("builder") == ENSEMBLE:
            raise ValueError(_expected(f"members.{k}.builder", f"one of {list(BUILDERS)} (no nested ensembles)",
                                       ENSEMBLE))
        member = check_architecture(member, where=where)
        if (member["in_channels"], member["num_classes"]) != (out["in_channels"], out["num_classes"]):
            raise ValueError(_expected(f"members.{k}",
                                       f"{out['in_channels']} input channel(s) and {out['num_classes']} "
                                       "classes, as the ensemble", Received(f"in_channels={member['in_channels']}, "
                                                                            f"num_classes={member['num_classes']}")))
        checked.append(member)
    out["members"] = checked
    parameters = estimated_parameters(out)
    if parameters > MAX_PARAMETERS:
        raise ValueError(_expected("members", f"networks of at most {MAX_PARAMETERS:,} parameters in all",
                                   Received(f"about {parameters:,} parameters")))
    return out


def estimated_parameters(spec: Mapping[str, Any]) -> int:
    """An upper estimate of the parameter count of a checked description (no Keras, nothing built).

    Every encoder and decoder convolution counted with the largest kernel of its stage, plus the
    transposed convolutions and heads; normalisation adds a few per channel.
    """
    if spec["builder"] == ENSEMBLE:
        return sum(estimated_parameters(member) for member in spec["members"])
    args = spec["args"]
    depth = args.get("depth", 4)
    features = args.get("features") or [min(args.get("base_filters", 16) * 2**i, args.get("max_filters", 320))
                                        for i in range(depth)]
    features = list(features)[:depth] + [features[-1]] * max(0, depth - len(features))
    kernels = [max(t) ** 3 for t in args.get("kernel_sizes") or [[3, 3, 3]] * depth]
    kernels += [27] * max(0, depth - len(kernels))
    blocks = args.get("blocks_per_stage") or [0]
    convs = max(args.get("convs_per_stage", 2), args.get("decoder_convs", 2), 2 * max(blocks) + 1)
    total, previous = 0, spec["in_channels"]
    for f, k in zip(features, kernels):
        total += convs * k * (max(previous, f) * f + 4 * f)
        previous = f
    for level in range(depth - 1):  # transposed conv, decoder convolutions on the concatenation, head
        f = features[level]
        total += 8 * features[level + 1] * f + convs * kernels[level] * 2 * f * f + (f + 1) * spec["num_classes"]
    return int(total + features[0] * spec["num_classes"])


def build_network(spec: Mapping[str, Any], **options: Any):
    """Build the (uncompiled) Keras network a description names, after :func:`check_architecture`.

    Parameters
    ----------
    spec
        A description (see :func:`check_architecture`).
    **options
        Builder options that do not change the weights (``sync_batch_norm``, a dtype policy).

    Returns
    -------
    keras.Model
    """
    from segpipe.models.resenc_unet import build_resenc_unet  # Keras: only when a network is built
    from segpipe.models.unet3d import build_unet3d  # Keras, as above

    spec = check_architecture(spec)
    if spec["builder"] == ENSEMBLE:
        return _build_ensemble(spec, **options)
    builder = build_resenc_unet if spec["builder"] == "resenc_unet" else build_unet3d
    try:
        return builder(spec["in_channels"], spec["num_classes"], **spec["args"], **options)
    except SettingError as exc:  # a combination the builder refuses (e.g. 3 strides for depth 4)
        raise ValueError(expected(exc.what, key=f"architecture.args.{exc.key}", received=exc.received)) from None


def _bounded_int(value: Any, low: int, high: int, key: str, _expected) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(_expected(key, f"an integer from {low} to {high}", value))
    return int(value)


__all__ = ["BUILDERS", "MAX_PARAMETERS", "architecture_from_model_config", "build_network", "check_architecture",
           "estimated_parameters"]


def _build_ensemble(spec: Mapping[str, Any], **options: Any):
    """One functional model: each member (its full-resolution probabilities) as a nested model
    ``member_<k>``, their probabilities averaged in float32. Every export format then holds the
    whole ensemble, and averaging before test-time mirroring equals averaging after (both linear)."""
    import keras

    from segpipe.models.unet3d import probability_model  # Keras, as above

    inputs = keras.Input(shape=(None, None, None, spec["in_channels"]), name="image")
    outputs = []
    for k, member in enumerate(spec["members"]):
        net = probability_model(build_network(member, **options))
        outputs.append(keras.Model(net.inputs, net.outputs[0], name=f"member_{k}")(inputs))
    averaged = keras.layers.Average(dtype="float32", name="ensemble_mean")(outputs)
    return keras.Model(inputs, averaged, name="ensemble")
