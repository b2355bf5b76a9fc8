"""Scoring segmentations: folders of predictions against references, summaries, and comparisons of runs."""
