"""Self-configuration: a plan of spacing, patch, network, batch and schedule from the dataset fingerprint.

``rules`` holds the pure rules, ``planner`` assembles them into a :class:`~segpipe.planning.planner.Plan`,
``hardware`` describes the machine, ``timing`` measures training steps (in a subprocess) and
``output`` writes plan.json and the editable YAML config. docs/planning.md lists every rule and its source.
"""
