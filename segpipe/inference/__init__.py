"""Inference: settings, reading bundles and loading their network per runtime, the sliding window, segmenting
scans, post-processing."""
