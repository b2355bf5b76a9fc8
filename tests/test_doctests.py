"""The examples in the docstrings of the small shared modules run as written."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["segpipe.errors", "segpipe.arrays", "segpipe.io.durable", "segpipe.io.nifti",
                                    "segpipe.io.scan_size", "segpipe.parallel", "segpipe.runs.rundir",
                                    "segpipe.settings", "segpipe.models.geometry", "segpipe.data.preprocess",
                                    "segpipe.inference.postprocess", "segpipe.inference.sliding_window",
                                    "segpipe.inference.integrity", "segpipe.models.architecture",
                          "segpipe.models.transfer",
                                    "segpipe.evaluation.postprocessing", "segpipe.reports.recommendation",
                                    "segpipe.evaluation.paired_statistics", "segpipe.tables", "segpipe.reports.tables",
                                    "segpipe.evaluation.options", "segpipe.evaluation.summary",
                                    "segpipe.data.labels", "segpipe.metrics.regions"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
