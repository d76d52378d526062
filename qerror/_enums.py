"""One rule for turning user input into enum members, with one kind of error message."""

from __future__ import annotations

import enum
from typing import Any, TypeVar

E = TypeVar("E", bound=enum.Enum)


def parse_enum(cls: type[E], value: Any, what: str) -> E:
    """``value`` if it is a member of ``cls``, else the member whose value or name it spells
    (case and surrounding spaces ignored).

    Raises
    ------
    ValueError
        Naming ``what`` was asked for and every accepted value.
    """
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        for member in cls:
            if key in (str(member.value).lower(), member.name.lower()):
                return member
    options = ", ".join(str(m.value) for m in cls)
    raise ValueError(f"{what} {value!r} is not one of: {options}")
