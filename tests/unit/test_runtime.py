"""The live state of a running appliance: worker count after `scale`, what was applied."""

from __future__ import annotations

from pathlib import Path

from appliance.config import Settings
from appliance.operations import restart_only_changes
from appliance.runtime import RuntimeState, live_settings, live_worker_count, read_state, with_workers, write_state


def settings(tmp_path: Path, count: int = 2) -> Settings:
    return with_workers(Settings(run_dir=tmp_path), count)


def test_without_a_running_appliance_the_config_count_holds(tmp_path: Path) -> None:
    assert read_state(tmp_path) is None
    assert live_worker_count(settings(tmp_path, 3)) == 3
    assert live_settings(settings(tmp_path, 3)).workers.count == 3


def test_a_live_scale_overrides_the_config_count(tmp_path: Path) -> None:
    state = RuntimeState(config_path="/etc/x.toml", render_context={"command": "c"}, config_workers=2, workers=5)
    write_state(tmp_path, state)
    assert read_state(tmp_path) == state
    assert live_worker_count(settings(tmp_path)) == 5
    live = live_settings(settings(tmp_path))
    assert live.workers.count == 5 and live.run_dir == tmp_path
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left over


def test_restart_only_changes_names_the_keys_a_reload_cannot_apply() -> None:
    applied = {"http": {"port": 80, "read_timeout": 3600}, "workers": {"count": 2, "base_port": 9100}, "run_dir": "/run/x"}
    reloadable = {"http": {"port": 80, "read_timeout": 60}, "workers": {"count": 4, "base_port": 9100}, "run_dir": "/run/x"}
    assert restart_only_changes(applied, reloadable) == []
    moved = {"http": {"port": 8080, "read_timeout": 3600}, "workers": {"count": 2, "base_port": 9200}, "run_dir": "/run/y"}
    assert restart_only_changes(applied, moved) == ["run_dir", "http.port", "workers.base_port"]
