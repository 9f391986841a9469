"""Runs started in the user's process (``nightshift run``, ``Pipeline.run``) go without
Prefect's flow run heartbeats unless asked; the setting is Prefect's own, for that run
only (docs/engine.md, "Heartbeats")."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.settings import get_current_settings

from nightshift.core.errors import NightshiftError
from nightshift.flows.pipeline import HEARTBEATS_ENV, ad_hoc_run, heartbeats_wanted


@flow
def frequency_seen_by_the_engine() -> int | None:
    """The heartbeat frequency in the flow run's settings context: the one Prefect's
    flow engine reads (``heartbeat_seconds``) when it starts the heartbeat thread."""
    return get_current_settings().flows.heartbeat_frequency


def test_an_ad_hoc_run_has_no_heartbeat_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(HEARTBEATS_ENV, raising=False)
    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None  # Prefect's default (180 s): deployment runs keep it
    wanted = heartbeats_wanted()
    assert wanted is False
    with ad_hoc_run(wanted):
        assert frequency_seen_by_the_engine() is None
    assert get_current_settings().flows.heartbeat_frequency == default  # this run only
    with ad_hoc_run(True):
        assert frequency_seen_by_the_engine() == default


@pytest.mark.parametrize(
    ("env", "argument", "expected"),
    [("on", None, True), ("off", None, False), ("auto", None, False), ("off", True, True)],
)
def test_heartbeats_are_chosen_by_argument_then_environment(
    monkeypatch: pytest.MonkeyPatch, env: str, argument: bool | None, expected: bool
) -> None:
    monkeypatch.setenv(HEARTBEATS_ENV, env)
    assert heartbeats_wanted(argument) is expected


def test_a_bad_heartbeats_setting_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HEARTBEATS_ENV, "sometimes")
    with pytest.raises(NightshiftError, match="NIGHTSHIFT_HEARTBEATS='sometimes'"):
        heartbeats_wanted()
