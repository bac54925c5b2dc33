"""Shared fixtures. Expensive things (a loaded SmolLM2, trained toy models) are session-scoped.

Feature areas may add their own fixtures below; keep each one cheap or session-scoped.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _workbench_home(tmp_path_factory):
    """Point WORKBENCH_HOME at a scratch directory unless the caller chose one.

    SmolLM2 is the exception: its converted copy is expensive, so tests that need it use the
    real home (where `make test` fetched it); see the `smollm2` fixture.
    """
    yield
