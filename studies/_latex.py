"""LaTeX macro names for the numbers the paper quotes: letters only, one prefix per study.

TeX control words are letters only, so the parts of a name that hold numbers or signs
(a bit width, a percentile, ``@``) are spelled out in words. Every study's macros start
with its own name (``\\driftAccNearestEvenEight``, ``\\datasetImagenetValUintEightGiB``),
so the macros files of all studies can be loaded into one paper without a clash.
"""

from __future__ import annotations

import math
import re

from qerror.stats import places_for

_ONES = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten",
         "Eleven", "Twelve", "Thirteen", "Fourteen", "Fifteen", "Sixteen", "Seventeen",
         "Eighteen", "Nineteen")
_TENS = ("", "", "Twenty", "Thirty", "Forty", "Fifty", "Sixty", "Seventy", "Eighty", "Ninety")
_SIGNS = {".": "Point", "+": "Plus", "-": "Minus", "@": "At"}


#: What Python and pandas print for a value that is no number ("nan", "inf", "-inf",
#: "<NA>") as a word of its own: not the letters of "information", nor TeX's ``\\infty``.
#: The paper's build and the README's renderer refuse a figure that reads so.
NOT_A_NUMBER = re.compile(r"(?<![A-Za-z\\])(?:nan|inf(?:inity)?)(?![A-Za-z])|<NA>", re.I)


def _number(digits: str) -> str:
    n = int(digits)
    if len(digits) > 1 and digits[0] == "0":
        # leading zeros are spelled: the decimals of 0.05 are not those of 0.5
        return "".join(_ONES[int(d)] for d in digits)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (_ONES[n % 10] if n % 10 else "")
    # Longer numbers digit by digit: short names, and 224 never reads as 2 and 24.
    return "".join(_ONES[int(d)] for d in digits)


def letters(text: object) -> str:
    """A macro-name part in letters only, each word capitalised.

    ``"toward_zero_4"`` → ``"TowardZeroFour"``, ``"other_p99.9"`` →
    ``"OtherPNinetyNinePointNine"``, ``"float32"`` → ``"FloatThirtyTwo"``, ``"0.05"`` →
    ``"ZeroPointZeroFive"`` (a run of digits with a leading zero digit by digit). Characters
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


def count(n: int) -> str:
    """A small count as the paper's prose writes it: a word below twenty (``4`` →
    ``"four"``), digits from twenty on."""
    n = int(n)
    return _ONES[n].lower() if 0 <= n < 20 else str(n)


def macro_name(study: str, key: str) -> str:
    """The full name of a study's macro: the study's name, then ``key``.

    A study named with underscores is written in camel case (``early_exit`` →
    ``earlyExit``), since a control word holds letters only.

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


def number(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits, for a macro set in running text.

    Never in exponent notation (``1040``, not ``1.04e+03``), and a negative value carries a
    true minus sign, which a hyphen in text mode is not.
    """
    if not math.isfinite(value):
        raise ValueError(f"a macro needs a finite number, got {value!r}")
    # rounded to its significant digits first: the places follow the rounded value, so
    # 9.996 is 10.0 (not 10.00) and 1036.2 is 1040 (not 1036)
    rounded = float(f"{abs(value):.{digits - 1}e}")
    if rounded == 0:
        text = "0"
    else:
        places = max(0, digits - 1 - math.floor(math.log10(rounded)))
        text = f"{rounded:.{places}f}"
    return ("\\ensuremath{-}" + text) if value < 0 and float(text) != 0 else text


def p_value(p: float, digits: int = 2, *, latex: bool = True,
            alpha: float | None = None) -> str:
    """A p-value for running text: ``digits`` significant digits (:func:`number`) down to
    0.001, below it in powers of ten, which :func:`number` would write out in full decimals
    (0.0000000026): ``\\ensuremath{2.6\\times10^{-9}}`` for a macro, ``2.6e-09`` with
    ``latex`` false (a log line, a CSV's text); 0 stays 0.

    With ``alpha``, the level the text judges ``p`` at (``p < alpha``), as many more digits
    as keep the figure on its side of ``alpha`` (:func:`places_for`): 0.0496 at α = 0.05 is
    0.0496, not 0.050.
    """
    if not math.isfinite(p) or not 0 <= p <= 1:
        raise ValueError(f"a p-value is a finite number in [0, 1], got {p!r}")
    if alpha is not None:
        digits = places_for(p, lambda v: v < alpha, lambda n: p_value(p, n, latex=False),
                            digits)
    if p == 0 or p >= 1e-3:
        return number(p, digits)
    text = f"{p:.{digits - 1}e}"
    if not latex:
        return text
    mantissa, exponent = text.split("e")
    return f"\\ensuremath{{{mantissa}\\times10^{{{int(exponent)}}}}}"


def signed(value: float, places: int = 2, minus: str = "\\ensuremath{-}") -> str:
    """``value`` with ``places`` decimals and its sign, for a difference set in running text:
    a true minus sign (:func:`number`; ``minus`` for text that is not LaTeX), a plus sign
    above zero, none on a value that rounds to zero."""
    if not math.isfinite(value):
        raise ValueError(f"a macro needs a finite number, got {value!r}")
    text = f"{abs(value):.{places}f}"
    if float(text) == 0:
        return text
    return (minus if value < 0 else "+") + text


# Column headers of the studies' LaTeX tables: a reader sees words and symbols, never a
# variable name. A column missing here is shown with its underscores as spaces.
HEADERS = {
    "acc": "accuracy", "acc_lo": "low", "acc_hi": "high",
    "quant_acc": "accuracy", "quant_lo": "low", "quant_hi": "high",
    "ci_low": "low", "ci_high": "high",
    "delta": r"$\Delta$ vs float", "delta_vs_float": r"$\Delta$ vs float",
    "delta_vs_nearest": r"$\Delta$ vs nearest", "diff": r"$\Delta$",
    "mcnemar_p": r"McNemar $p$", "p_vs_float": r"$p$ vs float",
    "p_vs_nearest": r"$p$ vs nearest", "p_value": r"$p$", "p_holm": r"$p$ (Holm)",
    "mcnemar_p_holm": r"McNemar $p$ (Holm)",
    "p_vs_float_holm": r"$p$ vs float (Holm)", "p_vs_nearest_holm": r"$p$ vs nearest (Holm)",
    "logit_sqnr_db": "logit SQNR (dB)", "sqnr_gain_db": r"$\Delta$SQNR (dB)",
    "agreement": "top-1 agreement", "agreement_with_float": "top-1 agreement",
    "recovered": "loss recovered",
    "exponent": "$p$", "lo_images": "low (images)", "hi_images": "high (images)",
    "lo_layers": "low (layers)", "hi_layers": "high (layers)",
    "min_frac_equal": "min equal", "median_frac_equal": "median equal",
    "max_abs_lsb": "max $|\\Delta|$ (LSB)",
    "input_bias_lsb": "input bias (LSB)", "input_mse_lsb": "input MSE (LSB$^2$)",
    "bias_lsb": "bias (LSB)", "min_error_lsb": "min error (LSB)",
    "max_error_lsb": "max error (LSB)", "double_mse_lsb": "double MSE (LSB$^2$)",
    "frac_test_pixels_off_grid": "test pixels off grid", "frac_codes_changed": "codes changed",
    "ratio_to_float32": "ratio to float32", "max_abs_logit_diff": "max $|\\Delta|$ logit",
    "alpha_aciq": r"$\alpha$ ACIQ", "alpha_exact_midrise": r"$\alpha$ exact",
    "mse_aciq_midrise": "MSE ACIQ", "mse_exact_midrise": "MSE exact (mid-rise)",
    "mse_exact_integer": "MSE exact (integer)", "mse_lloyd_max": "MSE Lloyd--Max",
    "holds_from_ratio": r"holds from $\sigma/\Delta$", "worst_rel_gap": "worst rel.\\ gap",
    "worst_at_ratio": r"worst at $\sigma/\Delta$",
    "in_h": "in $H$", "in_w": "in $W$", "out_h": "out $H$", "out_w": "out $W$",
    "kernel_h": "kernel $H$", "kernel_w": "kernel $W$", "live_fraction": "taps on data",
}

_TEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}"}


def escape(text: str) -> str:
    """``text`` with LaTeX's special characters made literal."""
    return "".join(_TEX_SPECIALS.get(ch, ch) for ch in text)


def header(column: str) -> str:
    """A table header for a column name: from :data:`HEADERS`, else words from the name."""
    return HEADERS.get(column, escape(column.replace("_", " ")))


def readable(frame):
    """A copy of ``frame`` for ``to_latex(escape=False)``: headers from :func:`header`, text
    cells escaped with underscores read as spaces (``nearest_even`` → ``nearest even``), and
    no negative zeros."""
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object or str(out[col].dtype) in ("string", "str"):
            out[col] = out[col].map(
                lambda v: escape(v.replace("_", " ")) if isinstance(v, str) else v)
        elif out[col].dtype.kind == "f":
            out[col] = out[col] + 0.0  # -0.0 reads as "-0" in a table; + 0.0 makes it 0.0
    out.columns = [header(str(c)) for c in out.columns]
    return out
