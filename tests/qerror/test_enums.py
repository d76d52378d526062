"""One parser for every named choice: API and command line give the same message."""

import argparse
import importlib
import pkgutil

import pytest

import qerror
from qerror._enums import Choice, ChoiceError
from qerror.rounding import RoundingMode


def _choices() -> list[type[Choice]]:
    for info in pkgutil.walk_packages(qerror.__path__, "qerror."):
        importlib.import_module(info.name)
    out, todo = [], list(Choice.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return sorted(out, key=lambda c: c.__qualname__)


def test_every_enum_of_the_library_is_a_choice():
    """No enum of qerror parses user input its own way."""
    import enum
    import inspect

    plain = []
    for info in pkgutil.walk_packages(qerror.__path__, "qerror."):
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            mine = inspect.isclass(obj) and obj.__module__ == mod.__name__
            if mine and issubclass(obj, enum.Enum) and not issubclass(obj, Choice):
                plain.append(f"{mod.__name__}.{name}")
    assert plain == []


@pytest.mark.parametrize("cls", _choices(), ids=lambda c: c.__name__)
def test_members_parse_from_themselves_their_value_and_their_name(cls):
    for m in cls:
        assert cls.parse(m) is m
        assert cls.parse(str(m.value)) is m
        assert cls.parse(f"  {m.name.lower()} ") is m
        assert cls.parse(m.name) is m


@pytest.mark.parametrize("cls", _choices(), ids=lambda c: c.__name__)
def test_a_bad_value_names_the_kind_and_every_option(cls):
    with pytest.raises(ValueError) as err:
        cls.parse("no-such-thing")
    text = str(err.value)
    assert text.startswith(f"{cls.what()} 'no-such-thing' is not one of: ")
    assert all(str(m.value) in text for m in cls)
    with pytest.raises(ChoiceError):
        cls.parse(3)


def test_kind_in_words_comes_from_the_class_name():
    assert RoundingMode.what() == "rounding mode"


def test_argparse_prints_the_same_message(capsys):
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--modes", nargs="+", type=RoundingMode.parse)
    assert parser.parse_args(["--modes", "floor", "NEAREST_EVEN"]).modes == [
        RoundingMode.FLOOR, RoundingMode.NEAREST_EVEN]
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--modes", "truncate"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --modes: rounding mode 'truncate' is not one of: nearest_even" in err
