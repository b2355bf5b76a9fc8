"""The largest-component post-processing in TensorFlow ops (the ``segment`` signature) against the NumPy path
(scipy.ndimage.label, 26-connected): random masks of several densities, ties, empty and full masks."""
import numpy as np
import pytest
from scipy import ndimage

from segpipe.export.graph_components import largest_component_mask, largest_component_steps
from segpipe.inference.postprocess import apply_largest_component_steps


def _scipy_largest(mask):
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == np.argmax(sizes)


@pytest.mark.parametrize("density", [0.05, 0.15, 0.3, 0.6])
def test_the_largest_component_equals_scipy_on_random_masks(density):
    import tensorflow as tf

    rng = np.random.default_rng(int(density * 100))
    for shape in [(9, 7, 5), (16, 12, 10)]:
        mask = rng.random(shape) < density
        got = largest_component_mask(tf.constant(mask)).numpy()
        np.testing.assert_array_equal(got, _scipy_largest(mask))


def test_ties_empty_and_full_masks():
    import tensorflow as tf

    tie = np.zeros((7, 3, 3), bool)
    tie[[1, 5], 1, 1] = True  # two single voxels: scipy keeps the first in C order
    np.testing.assert_array_equal(largest_component_mask(tf.constant(tie)).numpy(), _scipy_largest(tie))
    assert largest_component_mask(tf.constant(tie)).numpy()[1, 1, 1]
    empty = np.zeros((4, 4, 4), bool)
    assert not largest_component_mask(tf.constant(empty)).numpy().any()
    full = np.ones((4, 5, 6), bool)
    assert largest_component_mask(tf.constant(full)).numpy().all()
    # a long thin spiral-free snake: the propagation needs as many rounds as the path is long
    snake = np.zeros((20, 3, 3), bool)
    snake[:, 1, 1] = True
    snake[10, 1, 1] = False
    snake[19, 0, 0] = True  # corner-touching: 26-connected to (18, 1, 1)
    np.testing.assert_array_equal(largest_component_mask(tf.constant(snake)).numpy(), _scipy_largest(snake))


@pytest.mark.parametrize("largest_foreground,classes", [(True, ()), (False, (1, 2)), (True, (2,))])
def test_the_steps_equal_apply_largest_component_steps(largest_foreground, classes):
    import tensorflow as tf

    rng = np.random.default_rng(3)
    labels = rng.choice([0, 0, 0, 1, 2], size=(14, 11, 9)).astype(np.uint8)
    expected = apply_largest_component_steps(labels, largest_foreground=largest_foreground, classes=classes)
    assert not np.array_equal(expected, labels)  # the steps change something here
    got = largest_component_steps(tf.constant(labels), largest_foreground=largest_foreground, classes=classes).numpy()
    np.testing.assert_array_equal(got, expected)
