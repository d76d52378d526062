"""LaTeX macro names for the numbers the paper quotes: letters only, one prefix per study.

TeX control words are letters only, so the parts of a name that hold numbers or signs
(a bit width, a percentile, ``@``) are spelled out in words. Every study's macros start
with its own name (``\\driftAccNearestEvenEight``, ``\\datasetImagenetValUintEightGiB``),
so the macros files of all studies can be loaded into one paper without a clash.
"""

from __future__ import annotations

import re

_ONES = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten",
         "Eleven", "Twelve", "Thirteen", "Fourteen", "Fifteen", "Sixteen", "Seventeen",
         "Eighteen", "Nineteen")
_TENS = ("", "", "Twenty", "Thirty", "Forty", "Fifty", "Sixty", "Seventy", "Eighty", "Ninety")
_SIGNS = {".": "Point", "+": "Plus", "-": "Minus", "@": "At"}


def _number(digits: str) -> str:
    n = int(digits)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (_ONES[n % 10] if n % 10 else "")
    # Longer numbers digit by digit: short names, and 224 never reads as 2 and 24.
    return "".join(_ONES[int(d)] for d in digits)


def letters(text: object) -> str:
    """A macro-name part in letters only, each word capitalised.

    ``"toward_zero_4"`` → ``"TowardZeroFour"``, ``"other_p99.9"`` →
    ``"OtherPNinetyNinePointNine"``, ``"float32"`` → ``"FloatThirtyTwo"``. Characters
    other than letters, digits and ``. + - @`` separate words and are dropped.
    """
    out = []
    for token in re.findall(r"\d+|[A-Za-z]+|[.+\-@]", str(text)):
        if token.isdigit():
            out.append(_number(token))
        elif token in _SIGNS:
            out.append(_SIGNS[token])
        else:
            out.append(token[0].upper() + token[1:])
    return "".join(out)


def macro_name(study: str, key: str) -> str:
    """The full name of a study's macro: the study's name, then ``key``.

    A study name of several words joined by ``_`` is written in camel case
    (``rounding_choice`` → ``\\roundingChoiceAcc...``).

    Raises
    ------
    ValueError
        If the result holds anything but letters (build keys with :func:`letters`).
    """
    first, *rest = study.split("_")
    name = first + "".join(part[:1].upper() + part[1:] for part in rest) + key
    if not name.isalpha():
        raise ValueError(f"LaTeX macro names are letters only, got {name!r}")
    return name
