"""Experiment planning: the dataset fingerprint (and, from it, the plan of a run)."""
