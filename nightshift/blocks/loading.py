"""Loading a saved block by name: one way, from sync and async code alike."""

from __future__ import annotations

from typing import TypeVar

from prefect.blocks.core import Block
from pydantic import ValidationError

from nightshift.core.errors import NightshiftError, SpecError, one_line
from nightshift.core.validation import validation_message

B = TypeVar("B", bound=Block)


def load_block(cls: type[B], name: str, where: str, error: type[NightshiftError] = SpecError) -> B:
    """The saved ``cls`` block called ``name``.

    Loaded with ``_sync=True``: inside an async flow (the stream flow) Prefect's block
    calls otherwise return coroutines, and a sync caller gets the block either way. A
    missing block raises ``error`` in one line naming the spec key ``where``.
    """
    try:
        return cls.load(name, _sync=True)  # type: ignore[call-arg,return-value]
    except ValueError as exc:
        raise error(
            f"{where} {name!r}: no such {cls.get_block_type_name()} block ({one_line(exc)}); "
            "create it first (see README, 'Blocks')"
        ) from None
    except RuntimeError as exc:  # Prefect: "Unable to load ... due to failed validation"
        cause = exc.__cause__
        if not isinstance(cause, ValidationError):
            raise
        reason = validation_message(cause)
        raise error(
            f"{where} {name!r}: the saved {cls.get_block_type_name()} block no longer "
            f"loads ({reason}); save it again in the current shape: "
            f"{cls.__name__}(...).save({name!r}, overwrite=True) (see README, 'Blocks')"
        ) from None
