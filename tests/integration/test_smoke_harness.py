"""The harness itself: an appliance starts, serves health, and stops cleanly."""

from tests.harness import Appliance


def test_appliance_starts_healthy_and_stops_cleanly(make_appliance) -> None:  # type: ignore[no-untyped-def]
    appliance: Appliance = make_appliance(workers=2).start()
    doc = appliance.wait_healthy(workers=2)
    assert doc["status"] == "ok"
    appliance.stop()
    assert appliance.proc is not None and appliance.proc.returncode == 0
