"""paper/readme.py: the README's measured passages are what their records render, and the
records are the runs' own outputs (each file's sha256 is its manifest's)."""

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("paper_readme", REPO / "paper" / "readme.py")
readme = importlib.util.module_from_spec(_spec)
sys.modules["paper_readme"] = readme
_spec.loader.exec_module(readme)


def test_every_measured_passage_is_its_rendering():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    new, problems = readme.render(text)
    assert problems == []
    # a passage that differs names itself: run python paper/readme.py
    assert readme.differing(text, new) == []
    assert new == text


def test_the_command_line_check_agrees(capsys):
    assert readme.main(["--check"]) == 0


def _run(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    outputs = {}
    for name, text in files.items():
        (folder / name).write_text(text)
        outputs[name] = hashlib.sha256(text.encode()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps({"study": "x", "outputs": outputs,
                                                      "git": {"commit": "ab" * 20}}))
    return folder


def test_a_record_must_be_the_runs_own_output(tmp_path):
    run = _run(tmp_path / "run", {"a.csv": "x\n1\n", "b.csv": "y\n2\n"})
    root = tmp_path / "record"
    readme.add(f"r={run}", ["a.csv"], root)
    rec = readme.Record("r", root)
    assert rec.csv("a.csv").x.tolist() == [1] and rec.commit == "abababa"
    # a copy edited by hand (a number typed in) no longer matches the run's manifest
    (root / "r" / "a.csv").write_text("x\n2\n")
    with pytest.raises(readme.RecordError, match="differs from the output"):
        readme.Record("r", root)
    (root / "r" / "a.csv").write_text("x\n1\n")
    # a file the run did not write has no place in its record
    shutil.copyfile(run / "b.csv", root / "r" / "c.csv")
    with pytest.raises(readme.RecordError, match="not an output of its run"):
        readme.Record("r", root)
    with pytest.raises(readme.RecordError, match="not an output of"):
        readme.add(f"s={run}", ["nope.csv"], root)
    with pytest.raises(readme.RecordError, match="finished run's folder"):
        readme.add(f"s={tmp_path}", [], root)
    assert not (root / "s").exists()


def test_unknown_and_missing_passages_are_named():
    text = "a\n<!-- record: nothing-renders-this -->\nold\n<!-- /record -->\nb\n"
    new, problems = readme.render(text)
    assert new == text  # left as it was
    assert any("nothing-renders-this" in p and "no renderer" in p for p in problems)
    # and every renderer without its passage in this text
    assert sum("has no passage" in p for p in problems) == len(readme.RENDERERS)


def test_numbers_in_words():
    assert readme.pct(0.8881) == "88.81" and readme.points(0.005) == "+0.50"
    assert readme.pvalue(7.4e-8) == "7.4e-08" and readme.pvalue(1.0) == "1"
    assert readme.pvalue(0.0149) == "0.015" and readme.minutes(399) == "6.7"
    assert readme.span([0.601, 0.666]) == "0.60–0.67" and readme.span([0.329, 0.331]) == "0.33"
