"""Shared fixtures: settings reset between tests so one test's environment never leaks."""

from __future__ import annotations

import pytest

from etl_tasks.resources import reset_resources


@pytest.fixture(autouse=True)
def _fresh_resources():
    """Each test builds its own settings and connections from the environment it sets."""
    reset_resources()
    yield
    reset_resources()
