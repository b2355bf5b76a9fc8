"""Experiment planning: the dataset fingerprint and the plan of a run made from it.

``fingerprint`` summarises the dataset; ``rules`` and ``network`` hold the pure planning rules, ``planner``
assembles them into a :class:`~segpipe.planning.planner.Plan`, ``hardware`` describes the machine,
``timing`` measures training steps (in a subprocess), ``output`` writes plan.json and the editable
YAML config, and ``run`` does all of it for a config. docs/planning.md lists every rule and its source.
"""
