"""Building a loss from a name, a config dict or the compound form (what config files use)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from segpipe.errors import expected
from segpipe.losses.base import SegmentationLoss, available_losses, lookup
from segpipe.losses.compound import CompoundLoss, build_loss_from_spec

__all__ = ["get_loss", "available_losses"]


def get_loss(spec: str | Mapping[str, Any] | keras.losses.Loss, /, *,
             num_classes: int | None = None, **options: Any) -> keras.losses.Loss:
    """Build a loss from a name, a config dict or the compound form.

    Parameters
    ----------
    spec
        a registry name or alias (see :func:`available_losses`), a dict with ``name`` and
        options, a dict with ``terms`` (compound; ``name: compound`` optional), or an existing
        segpipe loss (returned as is).
    num_classes
        if given, per-class options (``class_weights``, focal ``alpha`` lists) are
        checked against it (number of output channels, background included).
    **options
        loss options (including ``reduction``); they override the dict's entries.

    Returns
    -------
    keras.losses.Loss
        A ``keras.losses.Loss`` whose ``call(y_true, y_pred)`` returns one float32 value per
        sample, shape (B,), and whose ``__call__`` reduces them as Keras does.

    Raises
    ------
    SettingError
        (a ``ValueError``) unknown name (the valid names are listed), unknown or
        invalid option; keyed by the option (``terms[1].alpha`` in a compound).
    ValueError
        a spec of another type, or ``num_classes`` that the options do not fit.

    Examples
    --------
    ::

        get_loss("tversky", alpha=0.3, beta=0.7)
        get_loss({"name": "tversky", "alpha": 0.3})
        get_loss({"terms": [{"name": "dice", "weight": 1}, {"name": "ce", "weight": 1}]})
    """
    if isinstance(spec, (SegmentationLoss, CompoundLoss)):
        if options:
            raise ValueError(expected("no options with an already built loss", key="options", received=options))
        loss = spec
    elif isinstance(spec, str):
        loss = lookup(spec)(**options)
    elif isinstance(spec, Mapping):
        loss = build_loss_from_spec({**spec, **options})
    else:
        raise ValueError(expected("a loss name, a config dict or a segpipe loss", key="spec", received=spec))
    if num_classes is not None:
        loss.check_num_classes(num_classes)
    return loss
