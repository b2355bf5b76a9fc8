"""Overlap and surface metrics (NumPy) for evaluation; streaming Keras metrics for training."""
