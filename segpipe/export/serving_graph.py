"""The ``segment`` signature: a raw scan to its label map, entirely inside the TensorFlow graph.

A bundle's ``savedmodel/`` holds, next to ``serving_default`` (window probabilities), a signature
``segment`` that does what ``predict.py`` does for a scan, so it runs with ``tf.saved_model.load``
or TensorFlow Serving on a machine without segpipe::

    segment(image: float32 (X, Y, Z, Cin), spacing_mm: float64 (3,)) -> {"labels": uint8 (X, Y, Z)}

Orientation: the image's voxel axes must already be in RAS order (what ``predict.py`` reaches by
reorienting, e.g. ``nibabel.as_closest_canonical``: a transpose and flips, no interpolation), and
``spacing_mm`` the voxel sizes along those axes (the norms of the affine's columns). The labels
come back on exactly that grid; reorient them back with the inverse transform. Everything else runs
in the graph, with the bundle's settings baked in at export:

1. crop to the bounding box of non-zero voxels (``crop_to_nonzero``);
2. normalise each channel (``zscore``, ``zscore_nonzero``, ``ct``, ``none``);
3. resample to the training spacing (``round(shape · spacing / target)`` voxels, voxel edges onto
   voxel edges, edge voxels extended), linear or cubic B-spline (``image_order`` 1 or 3; the cubic
   prefilter is solved as a tridiagonal system after 12 voxels of edge padding, as SciPy pads);
4. Gaussian-weighted sliding window with the bundle's overlap, windows per call and mirroring
   (flips inside the graph); windows are blended one row (start along axis 0) at a time with one
   ``scatter_nd`` per row, because a per-window update of a whole-volume tensor copies it;
5. probabilities resampled back linearly to the cropped grid, argmax, background outside the box;
   a region network (one sigmoid per region): label ``regions_class_order[i]`` where region i's
   probability is above 0.5, regions in order (:func:`segpipe.data.labels.regions_to_labels`).

6. the bundle's chosen post-processing (``postprocess_largest_foreground``, ``postprocess_largest_component``)
   on the cropped labels, by in-graph connected components (:mod:`segpipe.export.graph_components`).

It reproduces :func:`segpipe.inference.segment.segment_volume` up to float rounding (the tests require
≥ 99.9 % equal labels on an anisotropic, non-RAS scan). Not in the graph: reorientation.
Memory: the whole-volume float32 probabilities live in the graph (4·C bytes per voxel, plus
resampling temporaries); ``predict.py`` has the bounded-memory path.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from segpipe.data.preprocess import PreprocessSettings
from segpipe.errors import Received, expected
from segpipe.export.graph_components import largest_component_steps
from segpipe.inference.sliding_window import gaussian_importance_map, mirror_combinations

SEGMENT_INPUTS = ("image", "spacing_mm")
SUPPORTED_IMAGE_ORDERS = (1, 3)
_SPLINE_PAD = 12  # scipy.ndimage pads this many edge voxels before its spline prefilter (mode "nearest")


def unsupported_reason(preprocessing: PreprocessSettings) -> str | None:
    """Why the ``segment`` signature cannot reproduce these settings, or ``None`` if it can."""
    if preprocessing.target_spacing_mm is not None and preprocessing.image_order not in SUPPORTED_IMAGE_ORDERS:
        return (f"image_order={preprocessing.image_order}: the in-graph resampling supports image_order "
                f"{SUPPORTED_IMAGE_ORDERS} (linear, cubic B-spline)")
    return None


def build_segment_function(
    net,
    *,
    preprocessing: PreprocessSettings,
    patch_size: Sequence[int],
    overlap: float,
    mirror_axes: Sequence[int],
    batch_size: int,
    sigma_scale: float,
    in_channels: int,
    regions_class_order: Sequence[int] | None = None,
    largest_foreground: bool = False,
    largest_component: Sequence[int] = (),
):
    """A ``tf.function`` (image, spacing_mm) -> {"labels"}, a signature for ``tf.saved_model.save``.

    Parameters
    ----------
    net : keras.Model
        The single-output network (softmax, channels-last).
    preprocessing : PreprocessSettings
        The training preprocessing (baked in).
    patch_size, overlap, mirror_axes, batch_size, sigma_scale
        The sliding window (baked in).
    in_channels : int
        Input channels of the network.
    regions_class_order : sequence of int, optional
        For a region network (sigmoid outputs): the label value of each region. Default: classes (argmax).
    largest_foreground, largest_component
        The post-processing (``InferenceSettings.postprocess_largest_foreground`` /
        ``postprocess_largest_component``), applied to the labels in the graph.

    Returns
    -------
    segment : tf.function
        With the input signature ``image`` float32 (X, Y, Z, in_channels), ``spacing_mm`` float64 (3,).

    Raises
    ------
    ValueError
        Settings the graph cannot reproduce (:func:`unsupported_reason`), or not one normalisation per
        input channel.
    """
    import tensorflow as tf

    graph = _SegmentGraph.create(net, preprocessing=preprocessing, patch_size=patch_size, overlap=overlap,
                                 mirror_axes=mirror_axes, batch_size=batch_size, sigma_scale=sigma_scale,
                                 in_channels=in_channels, regions_class_order=regions_class_order,
                                 largest_foreground=largest_foreground, largest_component=largest_component)
    spec = [tf.TensorSpec([None, None, None, in_channels], tf.float32, name="image"),
            tf.TensorSpec([3], tf.float64, name="spacing_mm")]

    @tf.function(input_signature=spec, autograph=False)
    def segment(image, spacing_mm):
        return {"labels": graph.segment(image, spacing_mm)}

    return segment


@dataclass(frozen=True)
class _SegmentGraph:
    """What ``segment`` bakes in, and the steps of its graph as methods (TensorFlow imported by the caller)."""

    net: Any
    preprocessing: PreprocessSettings
    schemes: tuple[str, ...]  # the normalisation of each input channel
    window: tuple[int, ...]
    step: tuple[float, ...]  # window step per axis, in voxels
    weights: np.ndarray  # the Gaussian importance map of a window
    axis_weights: "_AxisGaussians"  # its per-axis factors
    flips: tuple[tuple[int, ...], ...]  # mirror combinations (spatial axes)
    batch_size: int
    in_channels: int
    num_classes: int
    regions_class_order: tuple[int, ...] | None = None  # region networks: label value of each region
    largest_foreground: bool = False  # post-processing: all foreground's largest component first
    largest_component: tuple[int, ...] = ()  # then each of these classes' largest component

    @classmethod
    def create(cls, net, *, preprocessing: PreprocessSettings, patch_size: Sequence[int], overlap: float,
               mirror_axes: Sequence[int], batch_size: int, sigma_scale: float, in_channels: int,
               regions_class_order: Sequence[int] | None = None, largest_foreground: bool = False,
               largest_component: Sequence[int] = ()) -> "_SegmentGraph":
        """Check the settings and precompute the window weights (see :func:`build_segment_function`)."""
        reason = unsupported_reason(preprocessing)
        if reason:
            raise ValueError(expected("preprocessing the segment signature can reproduce", key="preprocessing",
                                      received=Received(reason)))
        schemes = preprocessing.normalization
        schemes = (schemes,) * in_channels if isinstance(schemes, str) else tuple(schemes)
        if len(schemes) != in_channels:
            raise ValueError(expected(f"one normalization per input channel ({in_channels})",
                                      key="preprocessing.normalization", received=list(schemes)))
        window = tuple(int(w) for w in patch_size)
        num_outputs = int(net.outputs[0].shape[-1])
        if regions_class_order is not None:
            regions_class_order = tuple(int(v) for v in regions_class_order)
            if len(regions_class_order) != num_outputs or not all(1 <= v <= 255 for v in regions_class_order):
                raise ValueError(expected(f"one label value in 1..255 per network output ({num_outputs})",
                                          key="regions_class_order", received=list(regions_class_order)))
        return cls(net=net, preprocessing=preprocessing, schemes=schemes, window=window,
                   step=tuple(max(1.0, w * (1.0 - overlap)) for w in window),
                   weights=gaussian_importance_map(window, sigma_scale),
                   axis_weights=_axis_gaussians(window, sigma_scale),
                   flips=tuple(tuple(axes) for axes in mirror_combinations(mirror_axes)),
                   batch_size=int(batch_size), in_channels=int(in_channels), num_classes=num_outputs,
                   regions_class_order=regions_class_order, largest_foreground=bool(largest_foreground),
                   largest_component=tuple(int(c) for c in largest_component))

    # ------------------------------------------------------------ the six steps

    def segment(self, image, spacing_mm):
        """Labels (X, Y, Z) uint8 of a scan (X, Y, Z, Cin) on its own grid."""
        import tensorflow as tf

        full_shape = tf.shape(image)[:3]
        cropped, nonzero, lo, hi = self.crop(image, full_shape)  # 1.
        x = tf.stack([_normalize(cropped[..., c], nonzero, scheme, self.preprocessing, c)  # 2.
                      for c, scheme in enumerate(self.schemes)], axis=-1)
        x = self.to_training_spacing(x, hi - lo, spacing_mm)  # 3.
        probabilities = self.sliding_window(x)  # 4.
        if self.preprocessing.target_spacing_mm is not None:  # 5. back to the cropped grid (linear)
            probabilities = _resample(probabilities, hi - lo, 1)
        labels = self.to_labels(probabilities)
        if self.largest_foreground or self.largest_component:  # 6. (components never cross the empty border)
            labels = largest_component_steps(labels, largest_foreground=self.largest_foreground,
                                             classes=self.largest_component)
        return tf.pad(labels, tf.stack([lo, full_shape - hi], axis=1))  # background outside the box

    def to_labels(self, probabilities):
        """The label map of the probabilities: argmax, or for regions the later region above 0.5."""
        import tensorflow as tf

        if self.regions_class_order is None:
            return tf.cast(tf.argmax(probabilities, axis=-1), tf.uint8)
        labels = tf.zeros(tf.shape(probabilities)[:-1], tf.uint8)
        for i, value in enumerate(self.regions_class_order):  # later regions overwrite earlier ones (nnU-Net)
            labels = tf.where(probabilities[..., i] > 0.5, tf.constant(value, tf.uint8), labels)
        return labels

    def crop(self, image, full_shape):
        """1. The image cropped to its non-zero box (or whole), the non-zero mask there, and the box."""
        import tensorflow as tf

        if self.preprocessing.crop_to_nonzero:
            nonzero = tf.reduce_any(tf.not_equal(image, 0.0), axis=-1)
            lo, hi = _bounding_box(nonzero)
        else:
            nonzero = tf.ones(full_shape, tf.bool)
            lo, hi = tf.zeros([3], tf.int32), full_shape
        cropped = tf.slice(image, tf.concat([lo, [0]], 0), tf.concat([hi - lo, [-1]], 0))
        return cropped, tf.slice(nonzero, lo, hi - lo), lo, hi

    def to_training_spacing(self, x, cropped_shape, spacing_mm):
        """3. ``x`` resampled to ``round(shape · spacing / target)`` voxels (at least 1), if there is a target."""
        import tensorflow as tf

        target = self.preprocessing.target_spacing_mm
        if target is None:
            return x
        new_shape = tf.cast(tf.maximum(tf.constant(1.0, tf.float64), tf.round(
            tf.cast(cropped_shape, tf.float64) * spacing_mm / tf.constant(target, tf.float64))), tf.int32)
        return tf.cast(_resample(tf.cast(x, tf.float64), new_shape, self.preprocessing.image_order), tf.float32)

    def sliding_window(self, x):
        """4. Probabilities of ``x``, zero-padded (centred) to at least the window while it is predicted."""
        import tensorflow as tf

        shape = tf.shape(x)[:3]
        missing = tf.maximum(0, tf.constant(self.window) - shape)
        pad_lo = missing // 2
        x = tf.pad(x, tf.stack([tf.concat([pad_lo, [0]], 0), tf.concat([missing - pad_lo, [0]], 0)], axis=1))
        probabilities = self.blend(x)
        return tf.slice(probabilities, tf.concat([pad_lo, [0]], 0), tf.concat([shape, [-1]], 0))

    # ------------------------------------------------------------ the sliding window

    def network(self, x):
        """The network's probabilities of a batch of windows."""
        out = self.net(x, training=False)
        return out[0] if isinstance(out, (list, tuple)) else out

    def predict_mirrored(self, x):
        """The mean of the network's probabilities over the mirror combinations."""
        import tensorflow as tf

        total = None
        for axes in self.flips:
            batch_axes = [a + 1 for a in axes]
            p = self.network(tf.reverse(x, batch_axes) if axes else x)
            p = tf.reverse(p, batch_axes) if axes else p
            total = p if total is None else total + p
        return total / float(len(self.flips))

    def blend(self, image):
        """Σ w·p / Σ w over every window of an image (X, Y, Z, Cin) at least the window per side.

        Windows are blended one row (start along axis 0) at a time (:meth:`blend_row`).
        """
        import tensorflow as tf

        rows = _Rows.of(image, self)
        acc0 = tf.zeros(tf.concat([rows.shape, [self.num_classes]], 0))
        _, acc = tf.while_loop(lambda r, _: r < tf.size(rows.starts[0]), functools.partial(self.blend_row, rows),
                               [0, acc0])
        # Σ w is separable: the window weights are a product of per-axis Gaussians (over their maximum)
        norms = [_axis_norm(rows.shape[a], rows.starts[a], self.axis_weights[a]) for a in range(3)]
        norm = norms[0][:, None, None] * norms[1][None, :, None] * norms[2][None, None, :] / self.axis_weights.scale
        return acc / norm[..., None]

    def blend_row(self, rows: "_Rows", r, acc):
        """``acc`` plus the weighted probabilities of the windows of row ``r`` (one ``scatter_nd`` per row)."""
        import tensorflow as tf

        x0 = rows.starts[0][r]
        outputs = tf.TensorArray(tf.float32, size=rows.batches, element_shape=[self.batch_size, *self.window, None])
        _, outputs = tf.while_loop(lambda b, _: b < rows.batches, functools.partial(self.predict_batch, rows, x0),
                                   [0, outputs])
        updates = outputs.concat()
        classes = tf.shape(updates)[-1]
        ids = tf.minimum(tf.range(rows.batches * self.batch_size), rows.per_row - 1)
        corner = tf.gather(rows.corners_yz, ids)
        flat = tf.reshape(corner[:, 0] * rows.sz + corner[:, 1], [-1, 1]) + rows.local
        slab = tf.scatter_nd(tf.reshape(flat, [-1, 1]), tf.reshape(updates, [-1, classes]),
                             tf.stack([self.window[0] * rows.sy * rows.sz, classes]))
        slab = tf.reshape(slab, tf.stack([self.window[0], rows.sy, rows.sz, classes]))
        return r + 1, acc + tf.pad(slab, [[x0, rows.shape[0] - x0 - self.window[0]], [0, 0], [0, 0], [0, 0]])

    def predict_batch(self, rows: "_Rows", x0, b, outputs):
        """Write the weighted probabilities of batch ``b`` of the windows of the row at ``x0`` into ``outputs``."""
        import tensorflow as tf

        ids = b * self.batch_size + tf.range(self.batch_size)
        valid = tf.cast(ids < rows.per_row, tf.float32)
        ids = tf.minimum(ids, rows.per_row - 1)  # a short last batch repeats a window at weight 0
        corner = tf.gather(rows.corners_yz, ids)
        size = [*self.window, self.in_channels]
        x = tf.stack([tf.slice(rows.image, tf.stack([x0, corner[k, 0], corner[k, 1], 0]), size)
                      for k in range(self.batch_size)])
        p = self.predict_mirrored(x) * tf.constant(self.weights[None, ..., None]) * valid[:, None, None, None, None]
        return b + 1, outputs.write(b, p)


@dataclass(frozen=True)
class _Rows:
    """The windows of one image, as rows: the starts per axis, the (y, z) corners of a row, their batches."""

    image: Any
    shape: Any  # (X, Y, Z)
    starts: list  # window starts per axis
    corners_yz: Any  # (per_row, 2)
    per_row: Any
    batches: Any  # batches of batch_size windows per row
    sy: Any
    sz: Any
    local: Any  # flat index in a window-thick slab (window[0], Y, Z) of each voxel of a window at (0, 0)

    @classmethod
    def of(cls, image, graph: _SegmentGraph) -> "_Rows":
        import tensorflow as tf

        window = graph.window
        shape = tf.shape(image)[:3]
        starts = [_window_starts(shape[a], window[a], graph.step[a]) for a in range(3)]
        grid_y, grid_z = tf.meshgrid(starts[1], starts[2], indexing="ij")
        corners_yz = tf.stack([tf.reshape(grid_y, [-1]), tf.reshape(grid_z, [-1])], axis=1)
        per_row = tf.shape(corners_yz)[0]
        sy, sz = shape[1], shape[2]
        ix, iy, iz = tf.meshgrid(tf.range(window[0]), tf.range(window[1]), tf.range(window[2]), indexing="ij")
        return cls(image=image, shape=shape, starts=starts, corners_yz=corners_yz, per_row=per_row,
                   batches=(per_row + graph.batch_size - 1) // graph.batch_size, sy=sy, sz=sz,
                   local=tf.reshape(ix * sy * sz + iy * sz + iz, [1, -1]))


# ----------------------------------------------------------------------------------------------
# graph pieces (TensorFlow imported by the caller)


class _AxisGaussians(list):
    scale: float


def _axis_gaussians(window: Sequence[int], sigma_scale: float) -> _AxisGaussians:
    """The per-axis factors of :func:`gaussian_importance_map` (float64), and its normaliser."""
    out = _AxisGaussians()
    for w in window:
        sigma = max(w * sigma_scale, 1e-6)
        x = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
        out.append(np.exp(-0.5 * (x / sigma) ** 2).astype(np.float32))
    out.scale = float(np.prod([a.max() for a in out]))
    return out


def _window_starts(size, window: int, step: float):
    """:func:`segpipe.inference.sliding_window.window_starts` in the graph (round half to even as Python's round)."""
    import tensorflow as tf

    extra = tf.cast(size - window, tf.float64)
    num = tf.cast(tf.math.ceil(extra / step), tf.int32) + 1
    actual = extra / tf.cast(tf.maximum(num - 1, 1), tf.float64)
    starts = tf.cast(tf.round(actual * tf.cast(tf.range(num), tf.float64)), tf.int32)
    return tf.cond(size <= window, lambda: tf.zeros([1], tf.int32), lambda: starts)


def _axis_norm(size, starts, weights: np.ndarray):
    """Σ over windows of the per-axis Gaussian, along one axis (length ``size``)."""
    import tensorflow as tf

    w = len(weights)
    idx = tf.reshape(starts[:, None] + tf.range(w)[None, :], [-1, 1])
    values = tf.tile(tf.constant(weights), tf.shape(starts))
    return tf.scatter_nd(idx, values, tf.reshape(size, [1]))


def _bounding_box(mask):
    import tensorflow as tf

    shape = tf.shape(mask)
    lo, hi = [], []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        hits = tf.cast(tf.where(tf.reduce_any(mask, axis=others))[:, 0], tf.int32)
        # tf.cond calls its branches here, in this iteration: the loop variables are the current ones
        lo.append(tf.cond(tf.size(hits) > 0, lambda: tf.reduce_min(hits), lambda: 0))  # noqa: B023
        hi.append(tf.cond(tf.size(hits) > 0, lambda: tf.reduce_max(hits) + 1, lambda: shape[axis]))  # noqa: B023
    return tf.stack(lo), tf.stack(hi)


def _normalize(x, nonzero, scheme: str, settings: PreprocessSettings, channel: int):
    """One channel as ``segpipe.data.preprocess`` normalises it (statistics in float64)."""
    import tensorflow as tf

    if scheme == "zscore":
        x64 = tf.cast(x, tf.float64)
        mean = tf.reduce_mean(x64)
        std = tf.sqrt(tf.reduce_mean(tf.square(x64 - mean)))
        return (x - tf.cast(mean, tf.float32)) / tf.cast(tf.maximum(std, 1e-8), tf.float32)
    if scheme == "zscore_nonzero":
        values = tf.cast(tf.boolean_mask(x, nonzero), tf.float64)
        count = tf.size(values)
        mean = tf.cond(count > 0, lambda: tf.reduce_mean(values), lambda: tf.constant(0.0, tf.float64))
        std = tf.cond(count > 0, lambda: tf.sqrt(tf.reduce_mean(tf.square(values - mean))),
                      lambda: tf.constant(1.0, tf.float64))
        z = (x - tf.cast(mean, tf.float32)) / tf.cast(tf.maximum(std, 1e-8), tf.float32)
        return tf.where(nonzero, z, 0.0)
    if scheme == "ct":
        stats = settings.intensity_stats[channel]
        lo, hi = float(stats["percentile_00_5"]), float(stats["percentile_99_5"])
        return (tf.clip_by_value(x, lo, hi) - float(stats["mean"])) / max(float(stats["std"]), 1e-8)
    return x


def _resample(x, new_shape, order: int):
    """``segpipe.data.preprocess.resample`` of (X, Y, Z, C) in the graph, one axis at a time.

    Output voxel ``j`` samples input coordinate ``(j + 0.5) · n_in / n_out − 0.5`` (edge voxels
    extended: SciPy's ``mode="nearest"``); ``order`` 1 linear, 3 cubic B-spline.
    """
    import tensorflow as tf

    for axis in range(3):
        x = tf.cond(tf.shape(x)[axis] == new_shape[axis], lambda x=x: x,
                    lambda x=x, axis=axis: _resample_axis(x, new_shape[axis], axis, order))
    return x


def _resample_axis(x, n_out, axis: int, order: int):
    import tensorflow as tf

    dtype = x.dtype
    perm = [axis] + [a for a in range(4) if a != axis]
    inverse = np.argsort(perm).tolist()
    x = tf.transpose(x, perm)
    n_in = tf.shape(x)[0]
    factor = tf.cast(n_in, tf.float64) / tf.cast(n_out, tf.float64)
    coord = (tf.cast(tf.range(n_out), tf.float64) + 0.5) * factor - 0.5
    if order == 1:
        coord = tf.clip_by_value(coord, 0.0, tf.cast(n_in - 1, tf.float64))
        left = tf.cast(tf.floor(coord), tf.int32)
        right = tf.minimum(left + 1, n_in - 1)
        t = tf.cast(coord - tf.floor(coord), dtype)
        t = tf.reshape(t, [-1, 1, 1, 1])
        out = tf.gather(x, left) * (1 - t) + tf.gather(x, right) * t
    else:  # cubic B-spline on edge-padded samples, coefficients by a tridiagonal solve
        padded = tf.concat([tf.repeat(x[:1], _SPLINE_PAD, 0), x, tf.repeat(x[-1:], _SPLINE_PAD, 0)], 0)
        m = n_in + 2 * _SPLINE_PAD
        rest = tf.shape(padded)[1:]
        rhs = tf.reshape(tf.cast(padded, tf.float64), [m, -1])
        diag = tf.tensor_scatter_nd_update(tf.fill([m], 4.0 / 6.0), [[0], [m - 1]], [5.0 / 6.0, 5.0 / 6.0])
        off = tf.fill([m], 1.0 / 6.0)
        diag, off = tf.cast(diag, tf.float64), tf.cast(off, tf.float64)
        coef = tf.linalg.tridiagonal_solve(tf.stack([off, diag, off]), rhs, diagonals_format="compact",
                                           partial_pivoting=False)
        coef = tf.reshape(coef, tf.concat([[m], rest], 0))
        coord = coord + _SPLINE_PAD
        base = tf.floor(coord)
        t = coord - base
        taps = [(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6]
        base = tf.cast(base, tf.int32)
        out = 0
        for k, w in enumerate(taps):
            index = tf.clip_by_value(base - 1 + k, 0, m - 1)
            out += tf.gather(coef, index) * tf.reshape(tf.cast(w, coef.dtype), [-1, 1, 1, 1])
        out = tf.cast(out, dtype)
    return tf.transpose(out, inverse)
