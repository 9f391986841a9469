"""Prefix-aware sending (``send_order: prefix``): rows sharing a prompt prefix go out
together, nobody waits more than one sweep, and the answers at temperature 0 are those of
data-order sending (on the real vLLM server)."""

from __future__ import annotations

import asyncio
import random

from nightshift.serving.http import OpenAIBackend
from nightshift.serving.http.send_queue import SendQueue, prompt_text
from nightshift.serving.interface import GenerationRequest, SamplingParams

pytest_plugins = ["api_fixtures"]

TEMPLATES = [
    f"Template {k}. "
    + " ".join(f"Example {i}: {name} number {i} is written {i}." for i in range(30))
    for k, name in enumerate(["apple", "river", "engine"])
]


def rows(n_per_template: int, seed: int = 0) -> list[tuple[int, str]]:
    """(template, prompt) in random order."""
    picks = [t for t in range(len(TEMPLATES)) for _ in range(n_per_template)]
    random.Random(seed).shuffle(picks)
    return [(t, f"{TEMPLATES[t]}\nQuestion {n}: what comes next?") for n, t in enumerate(picks)]


def drain(queue: SendQueue[int]) -> list[int]:
    out = []
    while (item := queue.get_nowait()) is not None:
        out.append(item)
    return out


def test_prefix_order_groups_rows_that_share_a_prefix() -> None:
    data = rows(10)
    queue: SendQueue[int] = SendQueue("prefix")
    for n, (_, text) in enumerate(data):
        queue.put(n, text)
    order = [data[n][0] for n in drain(queue)]
    runs = [t for i, t in enumerate(order) if i == 0 or order[i - 1] != t]
    assert sorted(runs) == [0, 1, 2], f"each template's rows go out together: {order}"

    fifo: SendQueue[int] = SendQueue("fifo")
    for n, (_, text) in enumerate(data):
        fifo.put(n, text)
    assert drain(fifo) == list(range(len(data))), "fifo is data order"


def test_the_sweep_takes_late_rows_of_its_group_and_wraps_around() -> None:
    queue: SendQueue[str] = SendQueue("prefix")
    for text in ["b1", "b2", "c1", "a1"]:
        queue.put(text, text)
    assert queue.get_nowait() == "a1"
    assert queue.get_nowait() == "b1"
    queue.put("b3", "b3")  # a late row of the group being sent goes with it
    queue.put("a2", "a2")  # one behind the sweep waits for the wrap-around
    assert drain(queue) == ["b2", "b3", "c1", "a2"]


def test_get_waits_for_a_row_and_close_ends_the_lanes() -> None:
    async def scenario() -> list[str | None]:
        queue: SendQueue[str] = SendQueue("prefix")
        waiting = [asyncio.ensure_future(queue.get()) for _ in range(3)]
        await asyncio.sleep(0)
        queue.put("x", "x")
        await asyncio.sleep(0)
        queue.close()
        return await asyncio.gather(*waiting)

    assert sorted(asyncio.run(scenario()), key=str) == [None, None, "x"]


def test_chat_messages_sort_by_roles_and_contents_in_order() -> None:
    a = GenerationRequest(
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}]
    )
    b = GenerationRequest(
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "q2"}]
    )
    assert prompt_text(a).startswith("system\x01S\x00user\x01") and prompt_text(a) < prompt_text(b)


def test_prefix_order_gives_the_answers_of_data_order(vllm_server: str) -> None:
    """The same requests at temperature 0, sent in data order and prefix-aware, to the
    real server: every answer is the same (the prefix cache serves the grouped rows)."""
    sampling = SamplingParams(max_tokens=4, temperature=0.0)
    requests = [GenerationRequest(prompt=p, sampling=sampling) for _, p in rows(4, seed=1)]
    answers = {}
    for order in ("fifo", "prefix"):
        with OpenAIBackend(
            base_url=f"{vllm_server}/v1", model="smollm2", max_concurrency=4, send_order=order
        ) as backend:
            results = backend.generate(requests)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:1]
        answers[order] = [r.text for r in results]
    assert answers["prefix"] == answers["fifo"]
