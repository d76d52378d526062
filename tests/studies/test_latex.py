"""studies._latex and RunDir.write_macros: macro names in letters, one prefix per study."""


import pandas as pd
import pytest

from studies import _common
from studies._common import RunDir
from studies._latex import HEADERS, count, escape, header, letters, number, p_value


@pytest.mark.parametrize("text, expected", [
    ("toward_zero_4", "TowardZeroFour"),
    ("other_p99.9", "OtherPNinetyNinePointNine"),
    ("float32", "FloatThirtyTwo"),
    ("scale_+2pct", "ScalePlusTwoPct"),
    ("scale_+0.5pct", "ScalePlusZeroPointFivePct"),
    ("scale_+0.05pct", "ScalePlusZeroPointZeroFivePct"),  # not 0.5's name
    ("nearest_even@8", "NearestEvenAtEight"),
    ("3x224x224", "ThreeXTwoTwoFourXTwoTwoFour"),
    ("one image", "OneImage"),
    (40, "Forty"),
])
def test_macro_name_parts_are_spelled_in_letters(text, expected):
    assert letters(text) == expected


def test_macros_carry_the_study_name(tmp_path):
    with RunDir(tmp_path / "m", "drift", [], {}, force=True) as run:
        run.write_macros("m.tex", {"Acc" + letters("nearest_even_8"): "91.20"})
        out = run.finish()
    assert "\\newcommand{\\driftAccNearestEvenEight}{91.20}" in (out / "m.tex").read_text()


def test_a_study_name_of_several_words_is_camel_case(tmp_path):
    with RunDir(tmp_path / "m", "rounding_choice", [], {}, force=True) as run:
        run.write_macros("m.tex", {"Acc" + letters("nearest_4"): "91.20"})
        out = run.finish()
    assert "\\newcommand{\\roundingChoiceAccNearestFour}{91.20}" in (out / "m.tex").read_text()


def test_macro_names_must_be_letters(tmp_path):
    with RunDir(tmp_path / "m", "demo", [], {}, force=True) as run:
        with pytest.raises(ValueError, match="letters only"):
            run.write_macros("m.tex", {"bad_name1": "1"})
    assert _common.package_versions(["numpy"])["numpy"]


@pytest.mark.parametrize("value, digits, text", [
    (1039.537751, 3, "1040"),           # never 1.04e+03
    (32.560427, 3, "32.6"),
    (0.0106423, 2, "0.011"),
    (-7.898841, 2, "\\ensuremath{-}7.9"),  # a true minus sign, not a hyphen
    (-0.0001, 2, "\\ensuremath{-}0.00010"),
    (0.0, 3, "0"),
    (2.0, 3, "2.00"),
    # rounding up to the next power of ten keeps the digits asked for
    (9.996, 3, "10.0"),
    (0.09996, 3, "0.100"),
    (-0.9996, 2, "\\ensuremath{-}1.0"),
    (1036.2, 3, "1040"),                 # three significant digits, as 1039.5's 1040
    (99999.0, 2, "100000"),
])
def test_number_for_running_text(value, digits, text):
    assert number(value, digits) == text


@pytest.mark.parametrize("p, text", [
    (0.5, "0.50"), (0.0601, "0.060"), (0.001, "0.0010"), (1.0, "1.0"), (0.0, "0"),
    (2.5799819896648702e-09, "\\ensuremath{2.6\\times10^{-9}}"),
    (3.2e-274, "\\ensuremath{3.2\\times10^{-274}}"),
    (0.00099, "\\ensuremath{9.9\\times10^{-4}}")])
def test_p_value_for_running_text_never_writes_out_tiny_decimals(p, text):
    """A TOST side's p of 2.6e-9 was set as 0.0000000026 (number's full decimals)."""
    assert p_value(p) == text
    plain = p_value(p, latex=False)
    assert plain == (text if p == 0 or p >= 1e-3 else f"{p:.1e}") and float(plain) == \
        pytest.approx(p, rel=0.05)


@pytest.mark.parametrize("p", [float("nan"), float("inf"), -0.1, 1.5])
def test_p_value_refuses_what_is_no_probability(p):
    with pytest.raises(ValueError, match="p-value"):
        p_value(p)


@pytest.mark.parametrize("p, text", [
    (0.0496, "0.0496"), (0.04996, "0.04996"), (0.05, "0.050"), (0.0504, "0.050"),
    (0.0601, "0.060"), (0.00049, "\\ensuremath{4.9\\times10^{-4}}")])
def test_p_value_beside_its_level_reads_on_its_side_of_it(p, text):
    """A TOST p of 0.0496, a pass at α = 0.05, was printed 0.050 in the early-exit goal,
    the figure a p of 0.0504 that fails prints."""
    assert p_value(p, alpha=0.05) == text
    assert (float(p_value(p, latex=False, alpha=0.05)) < 0.05) == (p < 0.05)


def test_number_refuses_non_finite():
    with pytest.raises(ValueError, match="finite"):
        number(float("nan"))


def test_tables_read_as_words_with_escaped_cells(tmp_path):
    frame = pd.DataFrame({"mode": ["nearest_even", "50%_a&b"], "quant_acc": [0.5, -0.0],
                          "mcnemar_p": [float("nan"), 0.25], "odd_name": [1, 2]})
    with RunDir(tmp_path / "t", "drift", [], {}, force=True) as run:
        run.write_latex_table("t.tex", frame, "caption", "tab:t")
        out = run.finish()
    tex = (out / "t.tex").read_text()
    assert r"mode & accuracy & McNemar $p$ & odd name \\" in tex
    assert r"nearest even & 0.5 & -- & 1 \\" in tex
    assert r"50\% a\&b & 0 & 0.25 & 2 \\" in tex  # no "-0", specials escaped


def test_every_header_is_valid_latex_text():
    # Balanced braces and dollars: a header cannot break the table it sits in.
    for column, text in HEADERS.items():
        assert text.count("$") % 2 == 0, column
        assert text.count("{") == text.count("}"), column
    assert header("some_new_column") == "some new column"
    assert escape("a_b%c") == r"a\_b\%c"


@pytest.mark.parametrize("n, text", [(0, "zero"), (4, "four"), (19, "nineteen"), (20, "20"),
                                     (128, "128")])
def test_counts_in_words(n, text):
    assert count(n) == text
