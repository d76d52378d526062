"""studies._latex and RunDir.write_macros: macro names in letters, one prefix per study."""


import pytest

from studies import _common
from studies._common import RunDir
from studies._latex import letters


@pytest.mark.parametrize("text, expected", [
    ("toward_zero_4", "TowardZeroFour"),
    ("other_p99.9", "OtherPNinetyNinePointNine"),
    ("float32", "FloatThirtyTwo"),
    ("scale_+2pct", "ScalePlusTwoPct"),
    ("nearest_even@8", "NearestEvenAtEight"),
    ("3x224x224", "ThreeXTwoTwoFourXTwoTwoFour"),
    ("one image", "OneImage"),
    (40, "Forty"),
])
def test_macro_name_parts_are_spelled_in_letters(text, expected):
    assert letters(text) == expected


def test_macros_carry_the_study_name(tmp_path):
    with RunDir(tmp_path / "m", "drift", [], {}) as run:
        run.write_macros("m.tex", {"Acc" + letters("nearest_even_8"): "91.20"})
        out = run.finish()
    assert "\\newcommand{\\driftAccNearestEvenEight}{91.20}" in (out / "m.tex").read_text()


def test_a_study_name_of_several_words_is_camel_case(tmp_path):
    with RunDir(tmp_path / "m", "rounding_choice", [], {}) as run:
        run.write_macros("m.tex", {"Acc" + letters("nearest_4"): "91.20"})
        out = run.finish()
    assert "\\newcommand{\\roundingChoiceAccNearestFour}{91.20}" in (out / "m.tex").read_text()


def test_macro_names_must_be_letters(tmp_path):
    with RunDir(tmp_path / "m", "demo", [], {}) as run:
        with pytest.raises(ValueError, match="letters only"):
            run.write_macros("m.tex", {"bad_name1": "1"})
    assert _common.package_versions(["numpy"])["numpy"]
