"""Experiment planning: the plan of a run, made from a dataset fingerprint (:mod:`segpipe.data.fingerprint`).

``rules`` and ``network`` hold the pure planning rules (the target spacing among them, which the
fingerprint uses too), ``planner`` assembles them into a :class:`~segpipe.planning.plan.Plan`,
``hardware`` describes the machine, ``timing`` measures training steps (in a subprocess) and
``output`` writes plan.json and the editable YAML config. Nothing here opens a dataset or reads a
config: :func:`segpipe.cli.plan.plan_config` does all of it for a config. docs/planning.md lists
every rule and its source.
"""
