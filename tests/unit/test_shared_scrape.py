"""/metrics under a flood: concurrent requests share one scrape, and no answer is older than its request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from appliance import scrape
from appliance.config import Settings
from appliance.health import SingleFlight

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def scrapes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the scrape itself (supervisord, workers, nginx) by a counter: this is about sharing it."""
    made: list[int] = []

    async def counting(settings: Settings, checker: Any) -> bytes:
        made.append(len(made) + 1)
        await asyncio.sleep(0.05)
        return str(len(made)).encode()

    monkeypatch.setattr(scrape, "scrape", counting)
    return made


async def test_a_flood_of_metrics_requests_costs_one_scrape(scrapes: list[int]) -> None:
    shared = scrape.SharedScrape(Settings(), checker=None, interval=0.2)
    bodies = await asyncio.gather(*(shared.body() for _ in range(200)))
    assert scrapes == [1] and set(bodies) == {b"1"}


async def test_a_request_after_a_scrape_gets_a_newer_one(scrapes: list[int]) -> None:
    shared = scrape.SharedScrape(Settings(), checker=None, interval=0.05)
    assert await shared.body() == b"1"
    assert await shared.body() == b"2"  # what happened between two requests is in the second answer


async def test_requests_during_a_scrape_share_the_next_one(scrapes: list[int]) -> None:
    shared = scrape.SharedScrape(Settings(), checker=None, interval=0.1)
    first = asyncio.ensure_future(shared.body())
    await asyncio.sleep(0.01)  # the first scrape is under way: these must not get its (older) answer
    later = await asyncio.gather(*(shared.body() for _ in range(50)))
    assert await first == b"1" and set(later) == {b"2"} and scrapes == [1, 2]


async def test_a_client_that_gives_up_does_not_cancel_the_shared_scrape(scrapes: list[int]) -> None:
    shared = scrape.SharedScrape(Settings(), checker=None)
    impatient = asyncio.ensure_future(shared.body())
    patient = asyncio.ensure_future(shared.body())
    await asyncio.sleep(0.01)
    impatient.cancel()
    assert await patient == b"1"


async def test_concurrent_health_probes_share_one_round() -> None:
    rounds: list[int] = []

    async def probe_round() -> list[int]:
        rounds.append(1)
        await asyncio.sleep(0.05)
        return [len(rounds)]

    probes = SingleFlight(probe_round)
    results = await asyncio.gather(*(probes() for _ in range(100)))
    assert len(rounds) == 1 and all(r == [1] for r in results)
    assert await probes() == [2]  # nothing cached: the next call probes again
