"""Fixtures shared by the data tests."""
import pytest

from segpipe.data import cache as cache_module
from segpipe.data.preprocess import preprocess_case


@pytest.fixture
def count_preprocessing(monkeypatch):
    """Record the id of every case the cache preprocesses (instead of reusing)."""
    calls = []

    def counting(case, settings):
        calls.append(case.case_id)
        return preprocess_case(case, settings)

    monkeypatch.setattr(cache_module, "preprocess_case", counting)
    return calls
