"""Input rules every spec model shares: numbers are numbers, and errors are one line.

* **Strict numbers**: a spec's integer fields take integers only (``batch_size: true``
  is refused, not read as 1; neither are ``"10"`` nor ``2.0`` read as integers), and its
  float fields take numbers only (an integer is a number; a boolean is not)::

      from nightshift.core.validation import PositiveInt

      class Options(BaseModel):
          batch_size: PositiveInt = 10_000

* **One line** from a pydantic error (:func:`validation_message`): the key path at fault,
  the first problem, and how many more there are.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, Strict, ValidationError

#: An integer, never a boolean, a float or a string of digits.
Int = Annotated[int, Strict()]
#: An integer > 0.
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
#: An integer >= 0.
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
#: A number (an integer or a float), never a boolean or a string.
Float = Annotated[float, Strict()]
#: A number > 0.
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
#: A number >= 0.
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0)]

_NUMBER_ERRORS = {"int_type": "an integer", "float_type": "a number"}
_KINDS = {bool: "a boolean", str: "a string", float: "a float"}


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """One line from a pydantic error: ``key.path: message (and N more problems)``."""
    first = exc.errors()[0]
    parts = [prefix] if prefix else []
    for loc in first["loc"]:
        if isinstance(loc, str) and ("[" in loc or ("-" in loc and loc.endswith("]"))):
            continue  # pydantic's union/validator tags, not a key the user wrote
        if isinstance(loc, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{loc}]"]
        else:
            parts.append(str(loc))
    where = ".".join(parts)
    message = first["msg"].removeprefix("Value error, ")  # a validator's own message
    value = first.get("input")
    if first["type"] in _NUMBER_ERRORS and type(value) in _KINDS:
        shown = str(value).lower() if isinstance(value, bool) else repr(value)
        message = f"expected {_NUMBER_ERRORS[first['type']]}, got {shown} ({_KINDS[type(value)]})"
    more = len(exc.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{where}: {message}{tail}" if where else f"{message}{tail}"
