"""Streams that ride out outages and poison messages instead of stopping.

* A poison message (decodes, then fails a step) in a window of 20: the window is split
  until it is alone; it goes to the dead letters with the step, the error and the message
  id; the 19 others are written once; the stream goes on.
* A sink that cannot be reached at start is one ``error:`` line naming it (the traceback
  only with ``--verbose``).
* The outage drill (``tests/stream_drill.py``): PostgreSQL down 120 s and NATS down 60 s
  while messages flow; the stream catches up by itself, every message exactly once in
  every sink. It takes minutes of mostly idle waiting, so it starts in the background when
  the session starts (``conftest.py``, fixture ``stream_drill``) and this module's last
  test, collected last, waits for it and checks what it left.

Real ``nats-server -js``, PostgreSQL and Prefect API (``stream_fixtures``, conftest).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("stream_fixtures")  # also a plugin (below)
import yaml
from stream_fixtures import Nats, event, free_port, setup_streams, stream_entry

from nightshift.blocks.step_store import StepStore
from nightshift.flows.stream import stream
from nightshift.streams.sinks.store_sink import read_output

pytest_plugins = ["stream_fixtures"]


def test_poison_message_is_dead_lettered_alone_the_rest_written_once(
    tmp_path: Path, nats_server: Nats, nats_block: str
) -> None:
    setup_streams(nats_server, "POISON")
    events = [event(i, "p") for i in range(30)]
    ids = [e["id"] for e in events]
    seqs = nats_server.publish("POISON.in", events, msg_ids=[f"order-{i}" for i in ids])
    spec = {
        "store": {"url": f"file://{tmp_path / 'store'}"},
        "streams": [
            stream_entry(
                "poison",
                nats_server,
                "POISON",
                window={"count": 20, "seconds": 1},
                steps=[{"map": {"columns": {"n2": "n * 2"}}}, {"fail_on": {"value": 7}}],
                sinks=[{"store": {}}, {"nats": {"subject": "POISON.out"}}],
                fuse=False,
            )
        ],
    }
    state = asyncio.run(stream(spec=spec, until_idle_s=1.5, return_state=True))
    assert state.is_completed(), state.message
    summary = asyncio.run(state.aresult())["streams"][0]
    # the stream went on: every message handled, the poison one as a dead letter
    assert summary["messages"] == 30 and summary["rows_out"] == 29
    assert summary["dead_letters"] == 1
    first = summary["recent_windows"][0]
    assert (first["messages"], first["rows_out"], first["dead_letters"]) == (20, 19, 1), first
    good = [i for i in ids if i != "p7"]
    out = read_output(StepStore(url=f"file://{tmp_path / 'store'}"), "poison")
    assert out["id"].to_list() == good  # each once, in stream order
    published = [json.loads(m.data)["id"] for m in nats_server.messages("POISON_OUT")]
    assert sorted(published) == sorted(good)
    # alone in the dead letters, with the step, the error and the message id
    (dead,) = nats_server.messages("POISON_DEAD")
    assert json.loads(dead.data) == events[7]
    headers = dead.headers
    assert headers["Nightshift-Step"] == "steps[1] (fail_on)"
    assert headers["Nightshift-Error"] == "ValueError: cannot take n = 7"
    assert headers["Nightshift-Reason"] == "steps[1] (fail_on): ValueError: cannot take n = 7"
    assert headers["Nightshift-Seq"] == str(seqs[7])
    assert headers["Nightshift-Msg-Id"] == "order-p7"
    consumer = nats_server.consumer("POISON", "poison-consumer")
    assert consumer.num_pending == 0 and consumer.num_ack_pending == 0
    journal = [
        json.loads(p.read_text())
        for p in (tmp_path / "store" / "poison" / "windows").glob("*.json")
    ]
    assert [e["poison"] for e in journal if e["poison"]] == [[seqs[7]]]


def test_a_sink_that_cannot_be_reached_is_one_error_line(
    tmp_path: Path,
    nats_server: Nats,
    nats_block: str,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup_streams(nats_server, "NOPG", out=False)
    port = free_port()  # nothing listens there
    entry = stream_entry(
        "nopg",
        nats_server,
        "NOPG",
        window={"count": 5},
        sinks=[
            {"store": {}},
            {
                "postgres": {
                    "connection": {"url": f"postgresql://postgres@127.0.0.1:{port}/postgres"},
                    "table": "t",
                }
            },
        ],
    )
    path = tmp_path / "nopg.yaml"
    path.write_text(
        yaml.safe_dump({"store": {"url": f"file://{tmp_path}/store"}, "streams": [entry]})
    )
    code, output = _cli(["stream", str(path), "--check"], capfd, monkeypatch)
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    assert errors[0].startswith(f"error: streams[0].sinks[1].postgres: cannot connect to {url}: ")
    assert "Traceback" not in output, output
    code, output = _cli(["stream", str(path), "--check", "--verbose"], capfd, monkeypatch)
    assert code == 2 and "Traceback" in output, output


def _cli(
    args: list[str], capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """``nightshift ARGS`` in this process (its imports are done: seconds less than a
    subprocess); the exit status and everything written to stdout and stderr."""
    from nightshift.flows.cli import main

    with monkeypatch.context() as m:
        m.setenv("NIGHTSHIFT_LOG_LEVEL", "INFO")  # --verbose sets it (restored after)
        m.setattr("sys.argv", ["nightshift", *args])
        capfd.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main()
    out, err = capfd.readouterr()
    return int(exit_.value.code or 0), out + err


@pytest.mark.timeout(960)  # alone, it waits for the whole drill (about 3 minutes)
def test_an_outage_is_one_line_when_it_starts_and_one_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """However many tries fail: the lines of the drill's outages, without the servers."""
    import logging

    from nightshift.streams import outage

    log = logging.getLogger("test-outages")
    outages = outage.Outages("s", 60, log)
    outages.backlog = lambda: 42
    with caplog.at_level(logging.INFO, "test-outages"):
        for _ in range(100):
            outages.failed("sinks[1].postgres", "sinks[1].postgres: connection refused")
        assert outages.waiting_for() == ["sinks[1].postgres"]
        outages.current["sinks[1].postgres"].next_line = 0  # a minute later, say
        outages.failed("sinks[1].postgres", "connection refused")
        outages.recovered("sinks[1].postgres")
        outages.recovered("sinks[1].postgres")  # no outage: no line
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "s: waiting for sinks[1].postgres: connection refused; retrying (up to every 60 s)",
        "s: still waiting for sinks[1].postgres after 0 s (101 tries, 42 messages waiting): "
        "connection refused",
        "s: sinks[1].postgres is back after 0 s (101 tries); 42 messages waiting",
    ]
    assert outages.waiting_for() == [] and outages.ended[0]["messages_waiting"] == 42
    assert [outage.duration(s) for s in (59.4, 123, 3725)] == ["59 s", "2 min 3 s", "1 h 2 min"]
    backoff = outage.Backoff(0.5, 2)
    assert [backoff.pause() for _ in range(5)] == [0.5, 1, 2, 2, 2]


@pytest.mark.outage_drill  # the session starts the drill when this test is collected
def test_outage_drill_every_message_once_in_every_sink(stream_drill: Any) -> None:
    """Waits for the drill started at session start (see the module docstring)."""
    result = stream_drill.wait()
    print(  # what the drill costs the suite (pytest -s shows it)
        f"\noutage drill: {result.get('wall_s')} s wall-clock, {result.get('cpu_s')} s CPU "
        f"(servers and stream process included); caught up {result.get('caught_up_after_s')} s "
        f"after PostgreSQL came back; {len(result.get('published', []))} messages, "
        f"{result.get('published_during')} published during the outages, "
        f"{result.get('publish_retries')} publishes retried; log in {stream_drill.out}"
    )
    _check_drill(result)


def _check_drill(result: dict[str, Any]) -> None:
    assert result.get("error") is None, result.get("error")
    assert result["code"] == 0, result["log_tail"]
    ids = result["published"]
    assert len(ids) == len(set(ids)) >= 100
    # messages flowed before, during and after each outage
    assert result["published_during"]["postgres"] > 0 and result["published_during"]["nats"] > 0
    assert sorted(result["postgres"]) == sorted(ids), "PostgreSQL: lost or doubled"
    assert sorted(result["nats_out"]) == sorted(ids), "NATS sink: lost or doubled"
    assert sorted(result["store"]) == sorted(ids), "store sink: lost or doubled"
    assert result["consumer"] == {"num_pending": 0, "num_ack_pending": 0}
    # caught up by itself, soon after the servers came back
    assert result["caught_up_after_s"] < 60, result["caught_up_after_s"]
    log = result["log"].split('{\n  "streams"')[0]  # the log lines, not the summary
    assert "given up" not in log
    pg_sink = "streams[0].sinks[1].postgres"
    # one line when each outage starts, one when it ends; not one per try
    nats = "NATS nats://"
    for what in (pg_sink, nats):
        assert log.count(f"waiting for {what}") - log.count(f"still waiting for {what}") == 1, (
            result["log_tail"]
        )
        assert log.count(f"{what}") == log.count(f"waiting for {what}") + 1, result["log_tail"]
    # the run's summary: what it waited for, how long, how many messages were waiting
    outages = {o["what"].split(" nats://")[0]: o for o in result["summary"]["outages"]}
    assert outages[pg_sink]["seconds"] > 100 and outages["NATS"]["seconds"] > 45, outages
    assert result["summary"]["waiting_for"] == []
    assert log.count(f"{pg_sink}: {pg_sink}") == 0  # the sink named once per line
    assert log.count("still waiting for") <= 6, result["log_tail"]
    assert "Traceback" not in log
