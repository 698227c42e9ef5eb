"""Building blocks of the config schema: the strict section base, and runtime dataclasses as
sections.

Each setting is written once. A section that only the edge uses is a :class:`Section` (a
strict pydantic model). A section the runtime also uses is the runtime's own frozen dataclass
(``EngineConfig``, ``CascadeConfig``, ``ShadowConfig``), annotated with
:func:`runtime_section`: pydantic coerces and type-checks each field from the dataclass's
annotations (the parent's ``extra="forbid"`` and ``allow_inf_nan=False`` apply), then the
dataclass's ``__post_init__`` runs its own range and cross-field checks. Those checks raise
``ValueError("<field>=<value> ...")`` (dotted prefixes such as ``shadow.`` allowed); the
validator moves each such error onto that field's path, so the config error reads
``policy.shadow.window: shadow.window=10 must be >= ...`` as any other field's would.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

# a runtime check's message starts with the field it is about: "num_blocks=0 ..." or
# "shadow.window=10 ..."; the last dotted name is the field
_FIELD_PREFIX = re.compile(r"(?:[a-z_][a-z0-9_]*\.)*([a-z_][a-z0-9_]*)=")
# a runtime message quotes the value it refused; a string value may be of any length
MAX_MESSAGE_CHARS = 240
RUNTIME_CHECK = "runtime_check"  # the error type of a check made by a runtime dataclass


class Section(BaseModel):
    """A config section: unknown keys refused, frozen, no inf or NaN in floats."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def runtime_section(cls: type[Any]) -> WrapValidator:
    """Validate a YAML mapping into the frozen dataclass ``cls``, errors on field paths.

    Use as ``Annotated[EngineConfig, runtime_section(EngineConfig)]``. An unknown key reads
    "Extra inputs are not permitted", as in a :class:`Section`.
    """
    names = {f.name for f in dataclasses.fields(cls)}

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            errors = [_on_field(err, names, value) for err in exc.errors()]
            raise ValidationError.from_exception_data(exc.title, errors) from None

    return WrapValidator(validate)


def _on_field(err: Any, names: set[str], section: Any) -> InitErrorDetails:
    """One error of a runtime section, moved onto the field its message names."""
    loc = tuple(err["loc"])
    if err["type"] == "unexpected_keyword_argument":
        return {"type": "extra_forbidden", "loc": loc, "input": err["input"]}
    error = (err.get("ctx") or {}).get("error")
    if err["type"] != "value_error" or loc or not isinstance(error, ValueError):
        return {"type": err["type"], "loc": loc, "input": err["input"], "ctx": err.get("ctx", {})}
    message = str(error)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    match = _FIELD_PREFIX.match(message)
    field = match.group(1) if match and match.group(1) in names else None
    value = section.get(field) if isinstance(section, dict) and field else None
    return {
        "type": PydanticCustomError(RUNTIME_CHECK, "{message}", {"message": message}),
        "loc": (field,) if field else (),
        "input": value,
    }
