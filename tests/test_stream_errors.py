"""Bad stream specs and unreachable parts stop before any message, in one line that names
the key at fault."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("stream_fixtures")  # also a plugin (below)
import yaml
from conftest import run_cli
from stream_fixtures import Nats, setup_streams, stream_entry

from nightshift.core.errors import NightshiftError
from nightshift.flows.stream import stream
from nightshift.streams.plan import build_stream_plans
from nightshift.streams.spec import load_stream_spec

# the servers are session fixtures of a plugin: started once for every streaming test module
pytest_plugins = ["stream_fixtures"]

BASE: dict[str, Any] = {
    "name": "bad",
    "source": {"server": "nats://127.0.0.1:4222", "stream": "S", "subject": "S.in", "durable": "d"},
    "decode": {"columns": {"id": "string", "text": "string", "n": "int"}, "required": ["id"]},
    "dead_letter": {"subject": "S.dead"},
    "window": {"count": 10},
    "steps": [{"map": {"columns": {"n2": "n * 2"}}}],
    "sinks": [{"store": {}}],
}


def with_(path: str, value: Any) -> dict[str, Any]:
    entry = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = entry
    for key in parents:
        node = node[key]
    node[last] = value
    return entry


CASES = [
    (with_("window", {}), r"^spec: streams\[0\]\.window: give count, seconds or both$"),
    (with_("window", {"count": 0}), r"streams\[0\]\.window\.count: Input should be greater than 0"),
    (
        with_("source.server", "nats://u:secret@h:4222"),
        r"streams\[0\]\.source\.server: credentials do not go in the URL",
    ),
    (with_("source.durable", "has space"), r"streams\[0\]\.source\.durable: String should match"),
    (
        with_("decode.required", ["nope"]),
        r"streams\[0\]\.decode: required \['nope'\] not in columns",
    ),
    (
        with_("decode.columns", {"id": "uuid"}),
        r"streams\[0\]\.decode\.columns\.id: Input should be",
    ),
    (
        with_("decode.validate", "n + 1"),
        r"^streams\[0\]\.decode\.validate 'n \+ 1' gives Int64, not a boolean$",
    ),
    (
        with_("steps", [{"dedup": {"on": ["text"]}}]),
        r"^streams\[0\]\.steps\[0\] \(dedup\): a barrier step needs the whole data set",
    ),
    (
        with_("steps", [{"map": {"columns": {"xs": "[n, n]"}}}, {"explode": {"column": "xs"}}]),
        r"^streams\[0\]\.steps\[1\] \(explode\): makes rows of a new identity",
    ),
    (
        with_("steps", [{"filter": {"where": "missing > 1"}}]),
        r"^streams\[0\]\.steps\[0\] \(filter\): ",
    ),
    (with_("steps", [{"shout": {}}]), r"^streams\[0\]\.steps\[0\]: unknown operator 'shout'"),
    (
        with_("steps", [{"filter": {"where": "missing > 1"}, "name": "keep"}]),
        r"^streams\[0\]\.steps\[0\] \(keep: filter\): .*missing",
    ),
    (
        with_(
            "steps", [{"map": {"columns": {"m": "n"}}}, {"filter": {"where": "n > 1"}, "after": []}]
        ),
        r"^streams\[0\]\.steps\[1\] \(filter\)\.after: a stream's steps run as one chain, each "
        r"after the step before it \(after: \[map\]\); remove after, or split the stream$",
    ),
    (
        with_("steps", [{"map": {"columns": {"m": "n"}, "batch_size": True}}]),
        r"^streams\[0\]\.steps\[0\]\.map\.batch_size: expected an integer, got true \(a boolean\)$",
    ),
    (
        with_("window", {"count": True}),
        r"^spec: streams\[0\]\.window\.count: expected an integer, got true \(a boolean\)$",
    ),
    (with_("sinks", [{"kafka": {}}]), r"^streams\[0\]\.sinks\[0\]: unknown sink 'kafka'"),
    (
        with_(
            "sinks", [{"postgres": {"table": "t", "connection": {"url": "postgresql://u:pw@h/db"}}}]
        ),
        r"^streams\[0\]\.sinks\[0\]\.postgres\.connection: url: no password in the URL",
    ),
    (
        with_("sinks", [{"postgres": {"table": "bad name", "connection": {"block": "x"}}}]),
        r"^streams\[0\]\.sinks\[0\]\.postgres\.table: String should match",
    ),
    (
        with_(
            "sinks", [{"postgres": {"table": "t", "key": ["text"], "connection": {"block": "x"}}}]
        ),
        r"^streams\[0\]\.sinks\[0\]\.postgres\.key: column text may be null; add it to decode\.required$",
    ),
    (
        with_("sinks", [{"nats": {"subject": "S.out", "columns": ["nope"]}}]),
        r"^streams\[0\]\.sinks\[0\]\.nats: column nope is not in the output",
    ),
]


@pytest.mark.parametrize("entry,message", CASES, ids=[m[:40] for _, m in CASES])
def test_bad_stream_spec_is_one_line_naming_the_key(
    tmp_path: Path, entry: dict, message: str
) -> None:
    spec = {"store": {"url": f"file://{tmp_path}/store"}, "streams": [entry]}
    with pytest.raises(NightshiftError) as info:
        build_stream_plans(load_stream_spec(spec))
    text = str(info.value)
    assert "\n" not in text and "secret" not in text
    assert pytest.importorskip("re").search(message, text), text


#: bad ``steps:`` lists; a batch spec and a stream spec parse them with one parser
#: (``tasks.dag.parse_steps``), so each is refused with the same line
BAD_STEPS: list[list[Any]] = [
    [{"map": {"columns": {"m": "n"}}, "filter": {"where": "n > 1"}}],
    [{"map": "n * 2"}],
    [{"map": {"columns": {"m": "n"}}, "name": "1st"}],
    [{"map": {"columns": {"m": "n"}}, "after": 3}],
    [{"map": {"columns": {"m": "n"}}, "name": "a"}, {"filter": {"where": "n > 1"}, "name": "a"}],
    [{"map": {"columns": {"m": "n"}}}, {"filter": {"where": "n > 1"}, "after": ["nope"]}],
    [{"map": {"colums": {"m": "n"}}}],
    [{"shout": {}}],
    [{"nightshift.tasks.operators:Map": {"columns": {"m": "n"}}}],
]


@pytest.mark.parametrize("steps", BAD_STEPS, ids=range(len(BAD_STEPS)))
def test_stream_steps_are_refused_as_a_batch_specs_are(tmp_path: Path, steps: list[Any]) -> None:
    from nightshift.tasks.spec import load_spec

    batch = load_spec({"name": "b", "source": {"path": "x.jsonl"}, "steps": steps})
    with pytest.raises(NightshiftError) as batch_error:
        batch.step_nodes()
    spec = {"store": {"url": f"file://{tmp_path}/store"}, "streams": [with_("steps", steps)]}
    with pytest.raises(NightshiftError) as stream_error:
        build_stream_plans(load_stream_spec(spec))
    assert str(stream_error.value) == f"streams[0].{batch_error.value}"


def test_stream_steps_take_names(tmp_path: Path) -> None:
    steps = [
        {"map": {"columns": {"n2": "n * 2"}}, "name": "double"},
        {"filter": {"where": "n2 > 1"}, "after": ["double"]},
    ]
    spec = {"store": {"url": f"file://{tmp_path}/store"}, "streams": [with_("steps", steps)]}
    (plan,) = build_stream_plans(load_stream_spec(spec))
    assert [type(op).__name__ for op in plan.operators] == ["Map", "Filter"]
    assert [n.name for n in plan.spec.step_nodes()] == ["double", "filter"]


def test_spec_level_errors(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("streams:\n  - name: a\n   source: x\n")
    with pytest.raises(NightshiftError, match=r"bad\.yaml:3:\d+: invalid YAML"):
        load_stream_spec(bad_yaml)
    with pytest.raises(NightshiftError, match=r"a stream spec must be a mapping with 'streams:'"):
        load_stream_spec({"name": "x", "source": {"path": "a.jsonl"}, "steps": []})
    twice = {"streams": [BASE, {**BASE, "source": {**BASE["source"], "durable": "other"}}]}
    with pytest.raises(NightshiftError, match=r"streams\[1\]\.name 'bad' repeats streams\[0\]"):
        load_stream_spec(twice)
    # discovery and export: one line naming the key or option
    with pytest.raises(
        NightshiftError, match=r"^spec: streams: give at least one stream, or discover:"
    ):
        load_stream_spec({"streams": []})
    with pytest.raises(NightshiftError, match=r"^spec: discover\.table: String should match"):
        load_stream_spec({"discover": {"connection": {"block": "pg"}, "table": "no such"}})
    with pytest.raises(NightshiftError, match=r"^spec: discover\.connection: give exactly one"):
        load_stream_spec({"discover": {"connection": {}}})
    from nightshift.flows.stream import check_modes
    from nightshift.streams.export import export_stream

    static = load_stream_spec({"streams": [BASE]})
    with pytest.raises(NightshiftError, match=r"^discover: --discover needs a discover: section"):
        check_modes(static, discover=True)
    with pytest.raises(
        NightshiftError,
        match=r"^streams: the spec lists no stream; run with "
        r"--discover to poll nightshift_streams$",
    ):
        check_modes(load_stream_spec({"discover": {"connection": {"block": "pg"}}}), discover=False)
    with pytest.raises(NightshiftError, match=r"^--to out\.csv: give a \.parquet or \.jsonl file$"):
        export_stream(static, "bad", Path("out.csv"))
    with pytest.raises(
        NightshiftError,
        match=r"^--stream other: no such stream in the spec "
        r"\(streams: bad\)$",
    ):
        export_stream(static, "other", tmp_path / "out.jsonl")


def test_cli_prints_one_line_and_exits_2(tmp_path: Path, prefect_api: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "store": {"url": f"file://{tmp_path}/store"},
                "streams": [with_("window", {"seconds": -1})],
            }
        )
    )
    result = run_cli(["stream", str(path)], prefect_api)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "streams[0].window.seconds: Input should be greater than 0" in result.stderr


def test_unreachable_parts_fail_before_any_message(
    tmp_path: Path, nats_server: Nats, nats_block: str
) -> None:
    setup_streams(nats_server, "CHK", out=False)

    def check(entry: dict) -> str:
        spec = {"store": {"url": f"file://{tmp_path}/store"}, "streams": [entry]}
        state = asyncio.run(stream(spec=spec, check_only=True, return_state=True))
        assert state.is_failed()
        with pytest.raises(NightshiftError) as info:
            asyncio.run(state.aresult())
        return str(info.value)

    ok = stream_entry("chk", nats_server, "CHK", window={"count": 5})
    missing = copy.deepcopy(ok)
    missing["source"]["stream"] = "NOPE"
    assert check(missing) == (
        f"streams[0].source.stream 'NOPE': no such JetStream stream on {nats_server.url}"
    )
    no_dlq = copy.deepcopy(ok)
    no_dlq["dead_letter"] = {"subject": "nowhere.dead"}
    assert (
        "streams[0].dead_letter.subject 'nowhere.dead': no JetStream stream captures it"
        in check(no_dlq)
    )
    no_out = copy.deepcopy(ok)
    no_out["sinks"] = [{"nats": {"subject": "nowhere.out"}}]
    assert "streams[0].sinks[0].nats.subject 'nowhere.out': no JetStream stream" in check(no_out)
    anonymous = copy.deepcopy(ok)
    del anonymous["source"]["credentials"]  # the server wants a user: NATS says no
    assert check(anonymous).startswith(
        f"streams[0].source.server {nats_server.url}: cannot connect"
    )
    good = asyncio.run(
        stream(
            spec={"store": {"url": f"file://{tmp_path}/store"}, "streams": [ok]}, check_only=True
        )
    )
    assert good == {"checked": ["chk"]}
