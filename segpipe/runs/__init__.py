"""The run directory (:class:`.rundir.RunDir`: every path and reader of a run)."""
