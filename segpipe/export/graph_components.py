"""The largest-component post-processing inside a TensorFlow graph (the SavedModel ``segment`` signature).

:func:`largest_component_steps` is :func:`segpipe.inference.postprocess.apply_largest_component_steps`
(connectivity 3: faces, edges and corners) in TensorFlow ops, so a bundle's chosen post-processing runs
in the ``segment`` signature too. Connected components by label propagation: every voxel of the mask
starts with its raster index, and repeatedly takes the minimum over its 3×3×3 neighbourhood (inside the
mask) until nothing changes; a component then carries the raster index of its first voxel, which is
the order ``scipy.ndimage.label`` numbers components in, so ties in size keep the same component as
the NumPy path. The number of rounds is the longest shortest path inside a component (about its
extent for compact structures), each round three separable min-filters over the volume.
"""
from __future__ import annotations

from typing import Iterable

_NONE = 2**31 - 1  # the label of voxels outside the mask (above every raster index)


def largest_component_mask(mask):
    """The largest 26-connected component of the boolean ``mask`` (X, Y, Z), as a boolean tensor.

    An empty mask gives an empty mask. Ties keep the component whose first voxel (C order) comes first.
    """
    import tensorflow as tf

    shape = tf.shape(mask)
    ids = tf.reshape(tf.range(tf.size(mask, out_type=tf.int32), dtype=tf.int32), shape)
    none = tf.constant(_NONE, tf.int32)
    labels = tf.where(mask, ids, none)

    def neighbourhood_min(x):
        for axis in range(3):  # the 3×3×3 minimum is separable: one 3-wide minimum per axis
            pad = [[0, 0]] * 3
            pad[axis] = [1, 1]
            padded = tf.pad(x, pad, constant_values=_NONE)
            size = tf.shape(x)[axis]
            x = tf.minimum(tf.minimum(_take(padded, axis, 0, size), _take(padded, axis, 1, size)),
                           _take(padded, axis, 2, size))
        return x

    def step(current, _changed):
        updated = tf.where(mask, neighbourhood_min(current), none)
        return updated, tf.reduce_any(tf.not_equal(updated, current))

    labels, _ = tf.while_loop(lambda _l, changed: changed, step, [labels, tf.reduce_any(mask)])
    inside = tf.boolean_mask(labels, mask)
    components, index = tf.unique(inside)  # in order of first occurrence: the raster order of first voxels
    sizes = tf.math.unsorted_segment_sum(tf.ones_like(index), index, tf.size(components))
    # a last, empty candidate (label -1: no voxel has it) keeps argmax defined for an empty mask
    components = tf.concat([components, [-1]], axis=0)
    sizes = tf.concat([sizes, [0]], axis=0)
    largest = tf.gather(components, tf.argmax(sizes, output_type=tf.int32))
    return tf.logical_and(mask, tf.equal(labels, largest))


def largest_component_steps(labels, *, largest_foreground: bool = False, classes: Iterable[int] = ()):
    """The label map (X, Y, Z) after the chosen steps: all foreground first, then each class in ``classes``."""
    import tensorflow as tf

    zero = tf.zeros_like(labels)
    if largest_foreground:
        labels = tf.where(largest_component_mask(labels > 0), labels, zero)
    for value in sorted({int(c) for c in classes} - {0}):
        mask = tf.equal(labels, tf.constant(value, labels.dtype))
        labels = tf.where(mask & ~largest_component_mask(mask), zero, labels)
    return labels


def _take(x, axis: int, start: int, size):
    import tensorflow as tf

    begin = [0, 0, 0]
    begin[axis] = start
    extent = tf.unstack(tf.shape(x))
    extent[axis] = size
    return tf.slice(x, begin, tf.stack(extent))
