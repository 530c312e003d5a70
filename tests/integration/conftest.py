"""Fixtures that own real appliances: started per test (or module), always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import Appliance, cleanup, new_appliance


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def make_appliance() -> Iterator[Callable[..., Appliance]]:
    """Factory for appliances that this test starts; every one is stopped at teardown."""
    made: list[Appliance] = []

    def make(workers: int = 2, **overrides: Any) -> Appliance:
        appliance = new_appliance(workers, **overrides)
        made.append(appliance)
        return appliance

    try:
        yield make
    finally:
        for appliance in made:
            cleanup(appliance)
