"""A spec as a flow-run parameter, within what the Prefect server accepts.

A spec reaches its flow run as a parameter (shown in the UI, kept with the run), and the
Prefect server refuses parameters larger than ``PREFECT_SERVER_API_MAX_PARAMETER_SIZE``
(512 KiB of JSON by default) with HTTP 422. A spec that large is almost always one huge
map, schema or prompt list; instead of Prefect's raw ``PrefectHTTPStatusError``, the user
gets one line naming the size, the limit and the largest part of the spec::

    check_parameter_size({"spec": payload}, "spec")    # validate and run, before Prefect
    with parameters_accepted({"spec": payload}, "spec"):
        run_pipeline(spec=payload, ...)                 # the server's own limit

:func:`check_parameter_size` uses this process's setting (the server's default, and what
a temporary server started by ``nightshift run`` uses); :func:`parameters_accepted`
turns the server's own refusal (a server configured lower) into the same line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from pydantic import WithJsonSchema

from nightshift.core.errors import SpecError

# Optional flow parameters as the UI should show them: a plain field, left empty for
# None. Prefect renders ``str | None`` (JSON schema ``anyOf: [string, null]``) as a
# type switch ("Property is type 'None'"); these keep Python's type and validation and
# give the schema the one type a person types. Only the schema changes.
#: ``str | None``, a text field
OptionalText = Annotated[str | None, WithJsonSchema({"type": "string"})]
#: ``int | None``, a whole number
OptionalInt = Annotated[int | None, WithJsonSchema({"type": "integer"})]
#: ``float | None``, a number
OptionalFloat = Annotated[float | None, WithJsonSchema({"type": "number"})]
#: a step: its number or a name (``int | str``), a text field ("2", "01-dedup")
StepRef = Annotated[int | str, WithJsonSchema({"type": "string"})]
#: the same, optional
OptionalStep = Annotated[int | str | None, WithJsonSchema({"type": "string"})]

SETTING = "PREFECT_SERVER_API_MAX_PARAMETER_SIZE"


def parameter_limit() -> int:
    """The largest flow-run parameters, in bytes of JSON, that Prefect takes (0: no
    limit), as this process's Prefect settings say."""
    from prefect.settings import get_current_settings

    return get_current_settings().server.api.max_parameter_size


def check_parameter_size(parameters: dict[str, Any], what: str) -> None:
    """A one-line :class:`SpecError` when ``parameters`` exceed :func:`parameter_limit`."""
    limit = parameter_limit()
    size = _size(parameters)
    if limit and size > limit:
        raise SpecError(too_large(parameters, what, size, limit))


@contextmanager
def parameters_accepted(parameters: dict[str, Any], what: str) -> Iterator[None]:
    """Turn the server's 422 for parameters over its limit, raised while a flow run is
    created inside the block, into the one-line :class:`SpecError` of
    :func:`check_parameter_size`; any other error passes unchanged."""
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        yield
    except PrefectHTTPStatusError as exc:
        text = exc.response.text if exc.response is not None else ""
        found = re.search(r"parameters must be less than ([\d,]+) bytes", text)
        if exc.response is None or exc.response.status_code != 422 or found is None:
            raise
        limit = int(found.group(1).replace(",", ""))
        raise SpecError(too_large(parameters, what, _size(parameters), limit)) from None


def too_large(parameters: dict[str, Any], what: str, size: int, limit: int) -> str:
    """The line: sizes, the largest part of the spec, and what to do."""
    spec = parameters.get("spec", parameters)
    where, part = largest_part(spec)
    biggest = f"; the largest part is {where} ({part:,} bytes)" if where else ""
    return (
        f"{what}: too large to be a Prefect flow-run parameter: {size:,} bytes as JSON, and "
        f"the Prefect server takes at most {limit:,} ({SETTING}){biggest}; make it "
        f"smaller, or raise {SETTING} for the server and here (0: no limit)"
    )


def largest_part(value: Any) -> tuple[str, int]:
    """The key path (``steps[0].map.columns``) of the part that makes up most of
    ``value``, descending while one child holds at least half of its parent, and its size."""
    where, size = "", _size(value)
    while isinstance(value, (dict, list)) and value:
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        sizes = [(_size(child), key, child) for key, child in items]
        child_size, key, child = max(sizes, key=lambda s: s[0])
        if child_size * 2 < size:
            break
        where = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip(".")
        value, size = child, child_size
    return where, size


def _size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (how Prefect measures parameters)."""
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())
