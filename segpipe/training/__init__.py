"""Training a run: model/optimizer/loss builders and ``train()`` (:mod:`.train`), the loop, checkpoints,
distribution, interrupts, run info, sweeps of runs (:mod:`.sweep`)."""
