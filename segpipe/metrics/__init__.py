"""Overlap and surface metrics (NumPy) for evaluation; streaming Keras metrics for training."""
# Keep this package free of Keras/TensorFlow imports: the evaluator and its worker processes
# import it. The Keras metric is imported explicitly as ``segpipe.metrics.streaming``.
from segpipe.metrics.overlap import case_metrics

__all__ = ["case_metrics"]
