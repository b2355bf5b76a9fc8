"""Scoring segmentations: folders of predictions against references, predicting a run's validation cases,
summaries, and comparisons of runs."""
