"""Run-time endpoint errors name the endpoint (its URL without credentials) and keep each
endpoint's reason readable: no server, no model; nothing listens on the ports used."""

from __future__ import annotations

import time

from api_fixtures import _free_port

from nightshift.core.errors import one_line, shorten
from nightshift.serving.http import OpenAIBackend
from nightshift.serving.http.fleet import Fleet, Member
from nightshift.serving.http.limits import RateLimiter
from nightshift.serving.interface import GenerationRequest, SamplingParams


def _rows(n: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(prompt=f"row {i}", sampling=SamplingParams(max_tokens=2))
        for i in range(n)
    ]


def test_an_endpoint_refusing_connections_is_named_in_the_row_error() -> None:
    port = _free_port()  # nothing listens there: every connection is refused
    secret = "pw-9f1c"
    url = f"http://user:{secret}@127.0.0.1:{port}/v1?api-key={secret}"
    with OpenAIBackend(
        base_url=url,
        model="smollm2",
        api_key="sk-endpoint-errors",
        max_concurrency=2,
        timeout_s=2,
        max_attempts=2,
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
    ) as backend:
        results = backend.generate(_rows(3))
    shown = f"http://127.0.0.1:{port}/v1"
    for r in results:
        assert r.error and r.error.startswith(
            f"gave up after 2 attempts: {shown}: connection error: ConnectError: "
        ), r.error
        assert secret not in r.error and "user" not in r.error and "sk-endpoint" not in r.error


def test_a_lone_endpoint_down_for_long_names_itself_once() -> None:
    port = _free_port()
    with OpenAIBackend(
        base_url=f"http://127.0.0.1:{port}/v1",
        model="smollm2",
        max_concurrency=1,
        timeout_s=0.5,
        outage_after_s=0.5,
        max_attempts=100,
        backoff_initial_s=0.05,
        backoff_max_s=0.1,
    ) as backend:
        deadline = time.monotonic() + 30
        [result] = backend.generate(_rows(1))
        assert time.monotonic() < deadline
    where = f"http://127.0.0.1:{port}/v1"
    assert result.error and result.error.startswith(f"endpoint {where} is down: "), result.error
    assert result.error.count(where) == 1, result.error  # the breaker's last error: no echo


def test_each_endpoint_of_a_fleet_keeps_its_reason_whole_or_cut_at_a_word() -> None:
    long = "connection error: ConnectError: " + " ".join(f"word{i:03d}" for i in range(80))
    short = "503 Service Unavailable: the server is loading the model"
    members = [
        Member(f"http://gpu-{i}:8000/v1", None, 4, RateLimiter())  # type: ignore[arg-type]
        for i in (1, 2)
    ]
    members[0].out_reason, members[1].out_reason = long, short
    fleet = Fleet(
        members,
        name="smollm2",
        outage_after_s=1,
        probe_initial_s=0.1,
        probe_max_s=1,
        probe_timeout_s=1,
    )
    message = fleet._all_down(3.0)
    first, second = message.split("; last: ", 1)[1].split("; http://gpu-2:8000/v1: ")
    assert second == short, "a short reason is whole"
    cut = first.removeprefix("http://gpu-1:8000/v1: ")
    assert cut.endswith("...") and len(cut) <= 300
    assert long.startswith(cut.removesuffix("...")) and cut.removesuffix("...").split()[-1] in (
        long.split()
    ), f"cut inside a word: {cut[-20:]!r}"


def test_shorten_cuts_at_a_word() -> None:
    text = "alpha beta gamma delta epsilon"
    assert shorten(text, 100) == text
    assert shorten(text, 20) == "alpha beta gamma..."
    assert shorten("x" * 50, 20) == "x" * 17 + "...", "one long word: cut inside it"
    assert one_line("first line\nsecond", 300) == "first line"
    assert len(one_line("word " * 100, 50)) <= 50 and one_line("word " * 100, 50).endswith(
        "word..."
    )


def test_a_run_against_a_refusing_endpoint_fails_naming_it(tmp_path) -> None:
    from conftest import make_rows, write_jsonl

    from nightshift.core.errors import NightshiftError
    from nightshift.flows.pipeline import Pipeline
    from nightshift.tasks.operators import Generate

    port = _free_port()
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(4, "r"))
    pipe = Pipeline(
        "refused",
        source=str(tmp_path / "data" / "*.jsonl"),
        steps=[Generate(prompt="{{ text }}", output="a", max_tokens=2)],
        store=f"file://{tmp_path}/store",
        batch_size=4,
        retries=0,
        serving={
            "default": {
                "backend": "openai_compatible",
                "base_url": f"http://127.0.0.1:{port}/v1",
                "model": "smollm2",
                "max_attempts": 1,
            }
        },
    )
    try:
        pipe.run()
    except NightshiftError as exc:
        message = str(exc)
    else:
        raise AssertionError("the run did not fail")
    assert "\n" not in message
    assert f"first: gave up after 1 attempt: http://127.0.0.1:{port}/v1: connection error: " in (
        message
    ), message
