"""One rule for turning user input into enum members, with one kind of error message.

Every enum a user may spell as a string (rounding modes, range methods, engines, …) is a
:class:`Choice`; its :meth:`Choice.parse` is the only parser, used by the API and, as an
``argparse`` ``type=``, by the command lines, so a name is parsed once, at the edge.
"""

from __future__ import annotations

import argparse
import enum
import re
from typing import Any, TypeVar

C = TypeVar("C", bound="Choice")


class ChoiceError(ValueError, argparse.ArgumentTypeError):
    """A value that names no member. A ``ValueError`` for API callers; ``argparse`` prints
    its message as it stands (an ``ArgumentTypeError``) when ``parse`` is an option's type."""


class Choice(enum.Enum):
    """An enum whose members may be given by value or name.

    The error message names the kind of choice from the class name (``RoundingMode`` →
    "rounding mode").
    """

    @classmethod
    def what(cls) -> str:
        """The kind of choice in words, for messages."""
        return re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()

    @classmethod
    def parse(cls: type[C], value: Any) -> C:
        """``value`` if it is a member, else the member whose value or name it spells (case
        and surrounding spaces ignored).

        Raises
        ------
        ChoiceError
            A ``ValueError`` naming the kind of choice, the value and every accepted value.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if key in (str(member.value).lower(), member.name.lower()):
                    return member
        options = ", ".join(str(m.value) for m in cls)
        raise ChoiceError(f"{cls.what()} {value!r} is not one of: {options}")
