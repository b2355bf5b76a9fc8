"""Pictures of a run and of an evaluation: the training progress plot, slice overlays, HTML reports.

Matplotlib (Agg backend) and NumPy only: nothing here imports TensorFlow, so folder evaluation
and its reports stay light. Import the modules explicitly (``segpipe.reports.progress``, ...).
"""
