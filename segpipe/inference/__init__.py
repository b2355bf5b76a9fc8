"""Inference: settings, the sliding window, segmenting scans with a bundle, post-processing."""
