"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest

from tests.unit.datapaths import PARAMS


@pytest.fixture(params=PARAMS)
def datapath(request) -> str:
    """"python" or "native": a test taking it runs on both data paths."""
    return request.param


@pytest.fixture(params=PARAMS)
def qpair_datapath(request, monkeypatch) -> str:
    """Runs a test_qpair-style test (tests.unit.test_qpair.Host) on both data paths."""
    import tests.unit.test_qpair as tq
    monkeypatch.setattr(tq, "DATAPATH", request.param)
    return request.param
