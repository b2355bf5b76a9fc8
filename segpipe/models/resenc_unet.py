"""The residual-encoder U-Net (``model.name: resenc_unet``), nnU-Net's ResEnc style.

The encoder stacks basic residual blocks (two convolutions with normalisation, a skip connection,
LeakyReLU after the sum), more of them in the deeper stages (nnU-Net's presets: 1, 3, 4, 6, 6, 6, …
blocks); the decoder is plain, one convolution block per stage. "nnU-Net Revisited" (Isensee et
al., MICCAI 2024) found this the strongest CNN baseline. It shares the decoder, heads and deep
supervision with :func:`segpipe.models.unet3d.build_unet3d`, which builds it.
"""
from __future__ import annotations

from typing import Any, Sequence

import keras

from segpipe.errors import SettingError
from segpipe.models.unet3d import build_unet3d

RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6)  # residual blocks per encoder stage (nnU-Net's ResEnc presets)


def build_resenc_unet(
    in_channels: int,
    num_classes: int,
    *,
    depth: int = 4,
    blocks_per_stage: Sequence[int] | None = None,
    decoder_convs: int = 1,
    init: str = "he_normal",
    name: str = "resenc_unet",
    **kwargs: Any,
) -> keras.Model:
    """Build the residual-encoder U-Net; ``blocks_per_stage`` defaults to the first ``depth`` of 1, 3, 4, 6, 6, 6, 6.

    Every other keyword (``base_filters``, ``strides``, ``kernel_sizes``, ``features``, ``norm``,
    ``deep_supervision``, ...) is :func:`~segpipe.models.unet3d.build_unet3d`'s.

    Examples
    --------
    >>> model = build_resenc_unet(1, 3, depth=3, base_filters=4)
    >>> model.output_shape
    (None, None, None, None, 3)
    """
    if blocks_per_stage is None:
        if depth > len(RESENC_BLOCKS):
            raise SettingError("depth", f"<= {len(RESENC_BLOCKS)} without blocks_per_stage", depth)
        blocks_per_stage = RESENC_BLOCKS[:depth]
    return build_unet3d(in_channels, num_classes, depth=depth, blocks_per_stage=list(blocks_per_stage),
                        decoder_convs=decoder_convs, init=init, name=name, **kwargs)
