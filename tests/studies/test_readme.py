"""paper/readme.py: the README's measured passages are what their records render, and the
records are the runs' own outputs (each file's sha256 is its manifest's)."""

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from studies._common import STAGING_MARK

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


@pytest.mark.parametrize("missing", [None, float("nan"), float("inf")])
def test_a_figure_a_record_does_not_hold_is_a_record_error(missing):
    """A JSON output writes a float that is not finite as null (qerror.files.json_text): a
    passage stating it is refused as one whose figure the record lacks, never rendered."""
    with pytest.raises(readme.RecordError, match="the record does not hold it"):
        readme.pct(missing)
    assert readme.pct(0.8881) == "88.81"


def _commit(rev: str = "HEAD") -> str:
    """A commit of this repository (a record's run must be of one)."""
    return subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def _run(folder: Path, files: dict[str, str], **manifest) -> Path:
    folder.mkdir(parents=True)
    outputs = {}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        outputs[name] = hashlib.sha256(text.encode()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps({"study": "x", "outputs": outputs,
                                                      "git": {"commit": _commit()},
                                                      **manifest}))
    return folder


def test_a_record_must_be_the_runs_own_output(tmp_path):
    run = _run(tmp_path / "run", {"a.csv": "x\n1\n", "b.csv": "y\n2\n"})
    root = tmp_path / "record"
    readme.add(f"r={run}", ["a.csv"], root)
    assert "command" in json.loads((root / "r" / "record.json").read_text())
    rec = readme.Record("r", root)
    assert rec.csv("a.csv").x.tolist() == [1] and rec.commit == _commit()[:7]
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
    # beside the level it is judged at, a p-value never reads on the other side of it
    assert readme.pvalue(0.0496, 0.05) == "0.0496" and readme.pvalue(0.0504, 0.05) == "0.05"
    assert readme.tost_p(0.0496, 0.05) == "0.0496" and readme.tost_p(0.227, 0.05) == "0.227"
    assert readme.span([0.601, 0.666]) == "0.60–0.67" and readme.span([0.329, 0.331]) == "0.33"
    # no negative zero: a change that rounds to nothing carries no sign
    assert readme.points(-0.00004) == "0.00" and readme.plus(-0.3, 0) == "0"
    assert readme.plus(-0.6, 0) == "-1" and readme.plus(12.345, 1) == "+12.3"


def test_adding_again_replaces_a_record_whole_or_not_at_all(tmp_path):
    root = tmp_path / "record"
    first = _run(tmp_path / "run1", {"a.csv": "x\n1\n", "b.csv": "y\n2\n"})
    readme.add(f"r={first}", ["a.csv", "b.csv"], root)
    (root / "r" / "record.json").write_text(json.dumps({"command": "python -m studies.x", "machine": "m"}))
    # a later run with fewer outputs: the record is that run's alone, its words kept
    second = _run(tmp_path / "run2", {"a.csv": "x\n3\n"})
    readme.add(f"r={second}", ["a.csv"], root)
    rec = readme.Record("r", root)
    assert sorted(p.name for p in (root / "r").iterdir()) == ["a.csv", "manifest.json",
                                                              "record.json"]
    assert rec.csv("a.csv").x.tolist() == [3] and rec.about["machine"] == "m"
    # a run whose output was edited after it finished: refused, the record as it was
    third = _run(tmp_path / "run3", {"a.csv": "x\n4\n"})
    (third / "a.csv").write_text("x\n5\n")
    with pytest.raises(readme.RecordError, match="differs from the output"):
        readme.add(f"r={third}", ["a.csv"], root)
    assert readme.Record("r", root).csv("a.csv").x.tolist() == [3]
    assert sorted(p.name for p in root.iterdir()) == ["r"]  # no staging folder left


def test_a_ctrl_c_while_a_record_is_replaced_leaves_it_whole(tmp_path, monkeypatch):
    """Ctrl-C while the replaced record's files were removed left a record of neither run (a
    file of the old one gone, the new one's copies dropped): the old record or the new one
    stays, whole."""
    root = tmp_path / "record"
    first = _run(tmp_path / "run1", {"a.csv": "x\n1\n", "b.csv": "y\n2\n"})
    readme.add(f"r={first}", ["a.csv", "b.csv"], root)
    (root / "r" / "record.json").write_text(json.dumps({"command": "python -m studies.x",
                                                        "machine": "m"}))
    second = _run(tmp_path / "run2", {"a.csv": "x\n3\n", "b.csv": "y\n4\n"})
    rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        path = Path(path)
        if (path / "manifest.json").is_file() and (path / "a.csv").is_file():
            (path / "a.csv").unlink()  # part-way through a record's files
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(readme.shutil, "rmtree", interrupted)
    with contextlib.suppress(KeyboardInterrupt):
        readme.add(f"r={second}", ["a.csv", "b.csv"], root)
    rec = readme.Record("r", root)
    assert [rec.csv("a.csv").x.tolist(), rec.csv("b.csv").y.tolist()] in ([[1], [2]],
                                                                           [[3], [4]])
    assert (root / "r" / "record.json").is_file()


def test_records_without_words_or_figures_are_named(tmp_path):
    root = tmp_path / "record"
    run = _run(tmp_path / "run", {"a.csv": "x\n1\n"})
    readme.add(f"r={run}", ["a.csv"], root)
    (root / "r" / "record.json").unlink()
    with pytest.raises(readme.RecordError, match="no record.json"):
        readme.Record("r", root)
    (root / "r" / "record.json").write_text("{}")
    with pytest.raises(readme.RecordError, match="has no 'command'"):
        readme.Record("r", root)
    (root / "r" / "record.json").write_text('{"command": "python -m studies.x"}')
    with pytest.raises(readme.RecordError, match="has no 'machine'"):
        readme.Record("r", root).about["machine"]
    with pytest.raises(readme.RecordError, match="does not hold it"):
        readme.pct(float("nan"))


@pytest.mark.parametrize("which", ["manifest.json", "record.json"])
def test_a_record_whose_json_does_not_parse_is_named(tmp_path, which):
    """A manifest or record.json altered by one byte (its first brace gone), which no sha256
    guards: a RecordError naming the record and the file, as the check and the build
    report, not a bare JSONDecodeError."""
    run = _run(tmp_path / "run", {"a.csv": "x\n1\n"})
    root = tmp_path / "record"
    readme.add(f"r={run}", ["a.csv"], root)
    path = root / "r" / which
    path.write_text(path.read_text()[1:])
    with pytest.raises(readme.RecordError, match=rf"record r: {which} is not a JSON object"):
        readme.Record("r", root)
    # a run's own manifest, given to --add
    (run / "manifest.json").write_text((run / "manifest.json").read_text()[1:])
    with pytest.raises(readme.RecordError, match=r"manifest.json is not a JSON object"):
        readme.add(f"s={run}", ["a.csv"], root)
    assert not (root / "s").exists()


@pytest.mark.parametrize("which, key, value", [
    ("manifest.json", "outputs", ["a.csv"]), ("manifest.json", "outputs", None),
    ("manifest.json", "git", "abc"), ("manifest.json", "git", {"commit": 123}),
    ("manifest.json", "config", [1]), ("manifest.json", "argv", [5]),
    ("manifest.json", "argv", "--seed 1"), ("record.json", "command", 7),
])
def test_a_record_whose_json_has_another_shape_is_named(tmp_path, which, key, value):
    """JSON objects edited by hand into another shape (a list of outputs, a git that is no
    object, an argv that is no list of words): a RecordError naming the record and the file,
    not a TypeError or AttributeError from a check that reads them."""
    run = _run(tmp_path / "run", {"a.csv": "x\n1\n"})
    root = tmp_path / "record"
    readme.add(f"r={run}", ["a.csv"], root)
    path = root / "r" / which
    words = json.loads(path.read_text())
    words[key] = value
    path.write_text(json.dumps(words))
    with pytest.raises(readme.RecordError, match=rf"record r: its {which} is not "):
        readme.Record("r", root)


@pytest.mark.parametrize("record, file, old, new, says", [
    # formatted as it is ("median step nan s")
    ("baseline-train", "timing.json", '"median_step_seconds": 0.8051135709999926',
     '"median_step_seconds": NaN', "would state 'nan'"),
    # as today's runs write it (qerror.files.json_text), stopping a format or a sum
    ("baseline-train", "timing.json", '"median_step_seconds": 0.8051135709999926',
     '"median_step_seconds": null', "NoneType"),
    ("train-conv3-pool", "summary.json", '"test_accuracy": 0.9093',
     '"test_accuracy": null', "NoneType"),
    # or stopping the renderer (int(nan): "cannot convert float NaN to integer")
    ("compression", "points.csv", ",49843,", ",nan,", "cannot convert float NaN"),
])
def test_a_figure_that_is_not_a_number_in_its_record_is_named(tmp_path, record, file, old,
                                                               new, says):
    """A record whose run wrote a NaN where a passage states a figure: the passage is left
    as it was and the problem names it and the records it read, never "nan" in the README
    nor a traceback."""
    name = {"baseline-train": "baseline-train", "compression": "compression-table",
            "train-conv3-pool": "stem-frontier"}[record]
    root = tmp_path / "record"
    shutil.copytree(readme.RECORDS, root)
    path = root / record / file
    path.write_text(path.read_text().replace(old, new, 1))
    manifest = json.loads((root / record / "manifest.json").read_text())
    manifest["outputs"][file] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / record / "manifest.json").write_text(json.dumps(manifest))
    text = f"<!-- record: {name} -->\nold\n<!-- /record -->\n"
    out, problems = readme.render(text, root)
    assert out == text
    mine = [p for p in problems if f"'{name}'" in p and "has no passage" not in p]
    assert len(mine) == 1 and says in mine[0] and f"record {record}" in mine[0], problems


def test_an_unclosed_passage_is_named_and_nothing_is_written(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first = text.index("<!-- /record -->")
    broken = text[:first] + text[first + len("<!-- /record -->"):]  # the first left open
    _, problems = readme.render(broken)
    assert any("has no <!-- /record --> before the next passage" in p for p in problems)
    target = tmp_path / "README.md"
    target.write_text(broken, encoding="utf-8")
    monkeypatch.setattr(readme, "README", target)
    assert readme.main([]) == 1
    assert target.read_text(encoding="utf-8") == broken


@pytest.mark.parametrize("git", [{"commit": "ab" * 20, "dirty": True}, {"commit": None},
                                 {"commit": "ab" * 20, "dirty": False,
                                  "at_finish": {"commit": "cd" * 20, "dirty": False}}])
def test_a_record_comes_from_one_clean_commit(tmp_path, git):
    """A run made from uncommitted changes, outside git, or while the checkout moved on
    cannot name the code that produced it: refused, with the way out."""
    run = _run(tmp_path / "run", {"a.csv": "x\n1\n"})
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "git": git}))
    with pytest.raises(readme.RecordError, match="did not come from one clean commit"):
        readme.add(f"r={run}", ["a.csv"], tmp_path / "record")
    assert not (tmp_path / "record" / "r").exists()


def test_the_drift_passage_states_the_tail_count_its_record_was_made_with():
    """The tail passage stated the study's current TAIL_TOP (a constant typed here, held
    equal to studies.drift.TAIL_TOP) whatever count the record's tail columns were made
    with; a record names its own now, and one made before it did was made at 5."""
    assert readme.drift_tail_top({"tail_top": 3, "alpha": 0.05}) == 3
    assert readme.drift_tail_top({"alpha": 0.05}) == readme.DRIFT_UNRECORDED_TAIL_TOP == 5


def test_the_drift_passage_states_the_power_its_record_was_made_with():
    """The precision passage stated the study's current power (a constant typed here, held
    equal to studies.drift.RESOLVE_POWER) whatever power the record's counts were chosen
    for; a record names its own now, and one made before it did was made at 0.8."""
    assert readme.drift_power({"resolve_power": 0.9, "alpha": 0.05}) == 0.9
    assert readme.drift_power({"alpha": 0.05}) == readme.DRIFT_UNRECORDED_POWER == 0.8


def test_a_stale_twin_or_a_misspelt_marker_fails_the_check(tmp_path, monkeypatch, capsys):
    """--check compares the whole README, not one passage per name: a stale copy of a
    passage before the current one failed nothing, nor did a marker the pattern cannot read
    (an underscore), whose hand-typed text was never rendered."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("<!-- record: drift-fused-gain -->")
    end = text.index("<!-- /record -->", start) + len("<!-- /record -->")
    passage = text[start:end]
    stale = passage.replace("with it and", "with it (stale) and")
    target = tmp_path / "README.md"
    monkeypatch.setattr(readme, "README", target)
    loose = [stale.replace("<!-- record: drift-fused-gain -->", marker)
             for marker in ("<!-- record: drift-fused-gain --> ",
                            "<!-- record:drift-fused-gain -->")]
    for broken in (text[:start] + stale + "\n" + text[start:],
                   text + "\n<!-- record: early_exit -->\nmet every goal\n<!-- /record -->\n",
                   *(text[:start] + twin + "\n" + text[start:] for twin in loose)):
        target.write_text(broken, encoding="utf-8")
        assert readme.main(["--check"]) == 1
        assert target.read_text(encoding="utf-8") == broken
    err = capsys.readouterr().err
    assert "appears 2 times" in err and "'<!-- record: early_exit -->' is not a passage" in err
    assert err.count("its passage is never rendered nor checked") == 2


def test_a_smoke_run_is_never_a_record(tmp_path):
    folder = _run(tmp_path / "r", {"a.csv": "x\n"})
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "record.json").write_text(json.dumps({"command": "python -m studies.x",
                                                    "machine": "m"}))
    for smoke in ({"argv": ["--smoke"]}, {"config": {"smoke": True}}):
        (folder / "manifest.json").write_text(json.dumps({**manifest, **smoke}))
        with pytest.raises(readme.RecordError, match="is of a --smoke run"):
            readme.Record("r", tmp_path)
    (folder / "manifest.json").write_text(json.dumps({**manifest, "config": {"smoke": False}}))
    readme.Record("r", tmp_path)


def test_a_records_command_is_the_one_its_run_had(tmp_path):
    """record.json's command is checked against the manifest's study and argv: the options
    must be the run's (a value in capitals stands for a path the text explains), only where
    the run wrote and how it showed progress may be left out, and a script must be one of
    this repository's that runs the study."""
    folder = _run(tmp_path / "r", {"a.csv": "x\n"})
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(study="drift", argv=["--bits", "8", "4", "--weights", "/tmp/w.pt",
                                         "--out", "/tmp/o", "--force"])
    (folder / "manifest.json").write_text(json.dumps(manifest))

    def check(command):
        (folder / "record.json").write_text(json.dumps({"command": command, "machine": "m"}))
        return readme.Record("r", tmp_path)

    for good in ("python -m studies.drift --bits 8 4 --weights /tmp/w.pt",
                 "OMP_NUM_THREADS=1 python -m studies.drift --weights W --bits 8 4 "
                 "(W from python -m studies.train)",
                 "python -m studies.drift --bits 8 4 --weights W --out OUT"):
        check(good)
    for bad, why in (("python -m studies.bench --bits 8 4 --weights W", "not the run's"),
                     # capitals stand for a path, not for any value
                     ("python -m studies.drift --bits B 4 --weights W", "gives --bits B 4"),
                     # a script's own options are compared with the run's too
                     ("sh scripts/imagenet-throughput.sh", "gives --data"),
                     ("python -m studies.drift --bits 8 --weights W", "gives --bits 8, its"),
                     ("python -m studies.drift --bits 8 4 --weights W --smoke-like 1",
                      "gives --smoke-like"),
                     ("python -m studies.drift --bits 8 4", "had --weights"),
                     ("sh scripts/nowhere.sh", "not a script of this repository"),
                     ("drift with defaults", "not the run's")):
        with pytest.raises(readme.RecordError, match=why):
            check(bad)
    # the script's run: its own options (shell variables stand for its paths), and what
    # the command adds after its output folder
    script_argv = ["--data", "/tmp/x/images", "--weights", "/tmp/x/resnet50-random.pt",
                   "--images", "16", "--calib-images", "16", "--batch-size", "8", "--modes",
                   "nearest_even", "toward_zero", "--bits", "8", "--targets", "both",
                   "--remedy-bits", "--int8-images", "0", "--out", "/tmp/o", "--force"]
    manifest.update(argv=script_argv)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    check("sh scripts/imagenet-throughput.sh")
    with pytest.raises(readme.RecordError, match="had --device"):
        manifest.update(argv=script_argv + ["--device", "cuda"])
        (folder / "manifest.json").write_text(json.dumps(manifest))
        check("sh scripts/imagenet-throughput.sh")
    check("sh scripts/imagenet-throughput.sh OUT --device cuda")
    manifest.update(argv=script_argv[:5] + ["5000"] + script_argv[6:])  # --images 5000
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(readme.RecordError, match="gives --images 16, its run --images 5000"):
        check("sh scripts/imagenet-throughput.sh")
    manifest.update(study="train", argv=["--checkpoint", "/tmp/c.pt", "--no-progress"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    check("python -m studies.train")  # where the trained network was written


def test_the_scripts_use_their_own_checkouts_code(tmp_path):
    """Run as scripts, readme.py and build.py imported studies from whichever checkout the
    environment had installed in editable mode (another checkout's git_identity named its
    commit in the paper's provenance); a foreign studies package first on the path must not
    be the one they use."""
    import subprocess

    foreign = tmp_path / "studies"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("raise ImportError('a foreign studies package')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for argv in (["paper/readme.py", "--check"], ["paper/build.py", "--help"]):
        done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", "Upper", ".hidden", ""])
def test_a_record_name_is_a_folder_name(tmp_path, name):
    """A NAME with / or .. raised FileNotFoundError (or wrote beside paper/record)."""
    run = _run(tmp_path / "run", {"a.csv": "x\n1\n"})
    root = tmp_path / "record"
    with pytest.raises(readme.RecordError, match="NAME=RUN|lower-case letters"):
        readme.add(f"{name}={run}", ["a.csv"], root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_of_a_commit_not_in_this_repository_is_refused(tmp_path):
    run = _run(tmp_path / "run", {"a.csv": "x\n1\n"}, git={"commit": "f" * 40})
    with pytest.raises(readme.RecordError, match=f"commit {'f' * 40} is not in this repo"):
        readme.add(f"r={run}", ["a.csv"], tmp_path / "record")
    assert not (tmp_path / "record" / "r").exists()


def test_a_run_that_lacks_a_listed_output_or_is_staged_is_refused(tmp_path):
    """A missing output raised FileNotFoundError; a subfolder's too; a staging folder was
    taken as a finished run."""
    run = _run(tmp_path / "run", {"a.csv": "x\n1\n", "b.csv": "y\n2\n", "sub/c.csv": "z"})
    (run / "b.csv").unlink()
    root = tmp_path / "record"
    with pytest.raises(readme.RecordError, match="b.csv, listed in .* is not in that folder"):
        readme.add(f"r={run}", ["a.csv", "b.csv"], root)
    with pytest.raises(readme.RecordError, match="sub/c.csv is in a subfolder"):
        readme.add(f"r={run}", ["sub/c.csv"], root)
    (run / STAGING_MARK).write_text("made by a qerror study\n")
    with pytest.raises(readme.RecordError, match="staging folder"):
        readme.add(f"r={run}", ["a.csv"], root)
    assert not (root / "r").exists()


def test_re_adding_a_run_of_another_commit_or_machine_warns_that_the_words_stay(
        tmp_path, capsys):
    """The record.json written for one machine stayed, silently, with a run of another."""
    root = tmp_path / "record"
    first = _run(tmp_path / "a", {"a.csv": "1"}, platform="Linux-x86_64", machine={"cpus": 2},
                 git={"commit": _commit("HEAD~1")})
    readme.add(f"r={first}", ["a.csv"], root)
    (root / "r" / "record.json").write_text(json.dumps({"command": "python -m studies.x",
                                                        "machine": "an EPYC, one thread"}))
    same = _run(tmp_path / "b", {"a.csv": "2"}, platform="Linux-x86_64", machine={"cpus": 2},
                git={"commit": _commit("HEAD~1")})
    readme.add(f"r={same}", ["a.csv"], root)
    assert capsys.readouterr().err == ""  # the same machine and commit: nothing to say
    other = _run(tmp_path / "c", {"a.csv": "3"}, platform="Linux-aarch64", machine={"cpus": 64})
    readme.add(f"r={other}", ["a.csv"], root)
    err = capsys.readouterr().err
    assert "record r keeps its record.json (machine: 'an EPYC, one thread')" in err
    assert f"commit {_commit('HEAD~1')[:7]} → {_commit()[:7]}" in err
    assert "platform Linux-x86_64 → Linux-aarch64" in err and "cpus 2 → 64" in err
    assert readme.Record("r", root).about["machine"] == "an EPYC, one thread"


@pytest.mark.parametrize("damage", ["cut short", "a list"])
def test_re_adding_repairs_a_record_whose_manifest_is_damaged(tmp_path, capsys, damage):
    """Re-adding its run is how a damaged record is repaired: the comparison with the old
    run's manifest (for the warning on the kept words) stopped it with a JSONDecodeError or
    AttributeError; the old run is unknown, so the warning names every field."""
    root = tmp_path / "record"
    readme.add(f"r={_run(tmp_path / 'a', {'a.csv': '1'})}", ["a.csv"], root)
    (root / "r" / "record.json").write_text(json.dumps({"command": "python -m studies.x",
                                                        "machine": "m"}))
    old = root / "r" / "manifest.json"
    old.write_text(old.read_text()[1:] if damage == "cut short" else "[1]")
    readme.add(f"r={_run(tmp_path / 'b', {'a.csv': '2'})}", ["a.csv"], root)
    assert readme.Record("r", root).csv("a.csv").columns.tolist() == ["2"]
    assert "record r keeps its record.json (machine: 'm')" in capsys.readouterr().err


def test_re_adding_a_run_of_another_command_names_the_kept_words(tmp_path):
    """The refusal named the hidden staging folder ('record .r.bmd8i1zz: its command gives
    ...') and not the record.json kept from the record it replaces, whose command it was."""
    root = tmp_path / "record"
    first = _run(tmp_path / "a", {"a.csv": "1"}, argv=["--bits", "8"])
    readme.add(f"r={first}", ["a.csv"], root)
    other = _run(tmp_path / "b", {"a.csv": "2"}, argv=["--bits", "4"])
    with pytest.raises(readme.RecordError) as err:
        readme.add(f"r={other}", ["a.csv"], root)
    msg = str(err.value)
    assert msg.startswith("record r: its command gives --bits 8, its run --bits 4")
    assert f"the record.json kept from the record it replaces, {root / 'r' / 'record.json'}" \
        in msg
    assert readme.Record("r", root).manifest["argv"] == ["--bits", "8"]  # left as it was


_GONE = object()


def _set_config(root: Path, record: str, key: str, value=_GONE) -> None:
    """Record ``record`` under ``root`` with its manifest's ``config[key]`` set to
    ``value``, or removed where no value is given."""
    path = root / record / "manifest.json"
    manifest = json.loads(path.read_text())
    if value is _GONE:
        del manifest["config"][key]
    else:
        manifest["config"][key] = value
    path.write_text(json.dumps(manifest))


def _records_at(tmp_path: Path, alpha: float) -> Path:
    """A copy of the records whose runs used ``alpha`` (their manifests' config.alpha)."""
    root = tmp_path / "record"
    shutil.copytree(readme.RECORDS, root)
    for folder in root.iterdir():
        manifest = json.loads((folder / "manifest.json").read_text())
        if "alpha" in manifest.get("config", {}):
            manifest["config"]["alpha"] = alpha
            (folder / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_the_level_labels_are_the_records_alpha(tmp_path):
    """The compression table's "95% CI", the early-exit passage's "90 % interval of the
    TOST" and the sparse goal's "α = 0.05" were typed in: a run at another level was
    labelled with this one's."""
    records = readme.record_reader(_records_at(tmp_path, 0.1))
    assert "accuracy % [90% CI]" in readme.compression_table(records)
    assert "(not shown within one point at α = 0.1)" in readme.compression_goals(records)
    seeds = readme.early_exit_seeds(records)
    assert "(paired, 80 % interval of the TOST)" in seeds and "(80 % CI), points" in seeds
    assert "90 %" not in seeds
    # today's records: alpha 0.05
    records = readme.record_reader()
    assert "accuracy % [95% CI]" in readme.compression_table(records)
    assert "(paired, 90 % interval of the TOST)" in readme.early_exit_seeds(records)


def test_records_that_disagree_on_their_level_or_lack_it_are_refused(tmp_path):
    root = _records_at(tmp_path, 0.05)
    _set_config(root, "early-exit-seed1", "alpha", 0.1)
    with pytest.raises(readme.RecordError, match="disagree on the level"):
        readme.early_exit_seeds(readme.record_reader(root))
    _set_config(root, "compression", "alpha")
    with pytest.raises(readme.RecordError, match="record compression: .*config.alpha is None"):
        readme.compression_table(readme.record_reader(root))


def _train_summary_at(root: Path, name: str, ci, alpha=None) -> None:
    """Record ``name``'s summary.json with ``ci`` as its test interval, and ``alpha`` as its
    recorded level where given (its sha256 in its manifest, as a run would have written it)."""
    folder = root / name
    summary = json.loads((folder / "summary.json").read_text())
    summary["test_ci"] = list(ci)
    if alpha is not None:
        summary["test_ci_alpha"] = alpha
    (folder / "summary.json").write_text(json.dumps(summary))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["outputs"]["summary.json"] = hashlib.sha256(
        (folder / "summary.json").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_dataset_passage_renders_variants_that_are_checks(tmp_path):
    """studies.dataset leaves a variant whose codes are the model's own out of Holm's family,
    with a NaN adjusted p (on the baseline another subset's min-max and its 99.9th
    percentile): the passage's renderer refused such a run ('a figure a passage states is
    nan'), so no run of the current study could be recorded. Such a variant is named a
    check; a NaN p of a variant whose codes changed is still refused."""
    import pandas as pd

    root = tmp_path / "record"
    shutil.copytree(readme.RECORDS, root)
    folder = root / "dataset"
    var = pd.read_csv(folder / "offline_variants.csv")
    check = (var.frac_codes_changed == 0).to_numpy()
    assert check.sum() == 3 and not check.all()  # the model's own, and two others
    # as the study now writes it: the checks outside the family, Holm over the rest
    var["in_family"] = ~check
    var["same_test_as"] = ""
    var["mcnemar_p_holm"] = np.where(check, np.nan, var.mcnemar_p)

    def record(frame):
        frame.to_csv(folder / "offline_variants.csv", index=False)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["outputs"]["offline_variants.csv"] = hashlib.sha256(
            (folder / "offline_variants.csv").read_bytes()).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return readme.dataset_equivalence(readme.record_reader(root))

    text = record(var)
    assert text.count("the model's own codes: a check, no McNemar test") == 2
    tested = var[~check].iloc[0]
    assert (f"{tested.how}: {100 * tested.frac_codes_changed:.2f} % of the codes changed"
            in text)
    assert f"Holm-adjusted McNemar p {readme.pvalue(tested.mcnemar_p)} against" in text
    assert "nan" not in text
    var.loc[~check, "mcnemar_p_holm"] = np.nan  # codes that changed: a test is owed
    with pytest.raises(readme.RecordError, match="is nan"):
        record(var)


def test_the_trained_baselines_level_is_its_intervals(tmp_path):
    """studies.train records no level: the "95 % Wilson interval" was typed in. The level is
    the one that reproduces the recorded interval; an interval no Wilson level gives is
    refused."""
    from qerror.stats import wilson_ci

    root = tmp_path / "record"
    shutil.copytree(readme.RECORDS, root)
    summary = json.loads((root / "baseline-train" / "summary.json").read_text())
    k, n = round(summary["test_accuracy"] * summary["test_n"]), summary["test_n"]
    _train_summary_at(root, "baseline-train", wilson_ci(k, n, 0.1).ci)
    text = readme.baseline_train(readme.record_reader(root))
    assert "90 % Wilson interval" in text and "95 %" not in text
    _train_summary_at(root, "baseline-train", wilson_ci(k, n, 0.01).ci)
    assert "99 % Wilson interval" in readme.baseline_train(readme.record_reader(root))
    lo, hi = wilson_ci(k, n, 0.05).ci
    _train_summary_at(root, "baseline-train", (lo - 0.001, hi))  # not centred as Wilson's
    with pytest.raises(readme.RecordError, match="not the Wilson interval"):
        readme.baseline_train(readme.record_reader(root))
    assert "95 % Wilson interval" in readme.baseline_train(readme.record_reader())
    # a run that records its level (studies.train's test_ci_alpha) is named by it, and an
    # interval that is not that level's is refused
    _train_summary_at(root, "baseline-train", wilson_ci(k, n, 0.1).ci, alpha=0.1)
    assert "90 % Wilson interval" in readme.baseline_train(readme.record_reader(root))
    _train_summary_at(root, "baseline-train", wilson_ci(k, n, 0.1).ci, alpha=0.05)
    with pytest.raises(readme.RecordError, match="recorded test_ci_alpha 0.05"):
        readme.baseline_train(readme.record_reader(root))


def test_the_bench_intervals_level_is_the_records(tmp_path):
    """The median's "90 % interval" was studies.bench.MEDIAN_LEVEL of the day, whatever the
    recorded run used; and it named the level sought, not the coverage of the interval the
    order statistics give (11 pairs: 93.5 % at 90 %, 98.8 % at 95 %)."""
    root = tmp_path / "record"
    shutil.copytree(readme.RECORDS, root)
    _set_config(root, "bench-drift-amx", "median_level", 0.95)
    text = readme.bench_drift_amx(readme.record_reader(root))
    # the interval's exact coverage at 95 %: 1 - 2 P(Bin(11, 1/2) <= 1) = 1 - 24/2048
    assert "its median's 98.8 % interval" in text and "93.5 %" not in text
    _set_config(root, "bench-drift-amx", "median_level", 95)
    with pytest.raises(readme.RecordError, match="median_level is 95"):
        readme.bench_drift_amx(readme.record_reader(root))


def test_bench_records_with_median_intervals_state_their_level(tmp_path):
    """Every bench record whose bench.csv has intervals of the median states their level in
    its manifest (the one record from before the bench recorded it, which was named at its
    commit's studies.bench.MEDIAN_LEVEL, was replaced by a new run); a record without it is
    refused, not named at a guessed level."""
    checked = 0
    for folder in sorted(readme.RECORDS.iterdir()):
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("study") != "bench" or \
                "median_lo" not in (folder / "bench.csv").read_text().splitlines()[0].split(","):
            continue
        assert "median_level" in manifest["config"], folder.name
        checked += 1
    assert checked  # bench-drift-amx
    root = tmp_path / "record"
    shutil.copytree(readme.RECORDS, root)
    _set_config(root, "bench-drift-amx", "median_level")
    with pytest.raises(readme.RecordError, match="no config.median_level"):
        readme.bench_drift_amx(readme.record_reader(root))


# --------------------------------------------------------------------------- inline settings


def _outside_markers(text: str) -> str:
    """``text`` without its record passages and its inline settings' values."""
    text = re.sub(r"<!-- record: [a-z0-9-]+ -->\n.*?<!-- /record -->", "", text, flags=re.S)
    return re.sub(r"<!-- setting: [a-z0-9-]+ -->[^<\n]*<!-- /setting -->", "", text)


def test_the_levels_the_prose_states_are_the_code_constants(tmp_path, monkeypatch, capsys):
    """The README typed the early-exit study's level ('at α = 0.05', 'z₀.₉₅'), the
    compression study's ('a 95% Wilson interval') and the drift study's power ('with 80 %
    power') and tail count ('its five most extreme images') outside any passage: a changed
    constant left them stating the old one, and --check passed. Each is now an inline
    setting written from the constant that sets it."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    outside = _outside_markers(text)
    for typed in ("α = 0.05", "95% Wilson", "80 % power", "z₀.₉₅", "five most extreme"):
        assert typed not in outside
    assert readme.subscript("0.95") == "₀.₉₅"
    monkeypatch.setattr(readme, "DRIFT_RESOLVE_POWER", 0.9)
    monkeypatch.setattr(readme, "DRIFT_TAIL_TOP", 7)
    monkeypatch.setattr(readme, "EARLY_EXIT_ALPHA", 0.01)
    monkeypatch.setattr(readme, "COMPRESSION_ALPHA", 0.1)
    monkeypatch.setattr(readme, "imagenet_memory", lambda: {
        "kept": 3 * 2 ** 30, "bn": 4 * 2 ** 30, "resampled": 5 * 2 ** 30, "pixels": 2 ** 30})
    new, problems = readme.render(text)
    assert problems == []
    assert readme.differing(text, new) == []  # no record passage moves
    assert readme.differing_settings(text, new) == sorted(readme.SETTINGS)
    assert new.count("<!-- setting: drift-power -->90<!-- /setting --> % power") == 3
    assert new.count("α = <!-- setting: early-exit-alpha -->0.01<!-- /setting -->") == 2
    assert "<!-- setting: early-exit-z -->z₀.₉₉<!-- /setting --> standard errors" in new
    assert "a <!-- setting: compression-level -->90<!-- /setting -->% Wilson" in new
    assert "<!-- setting: drift-tail-top -->seven<!-- /setting --> most extreme" in new
    assert "<!-- setting: imagenet-kept-gib -->3.0 GiB<!-- /setting --> of means" in new
    assert "<!-- setting: imagenet-bn-gib -->4.0 GiB<!-- /setting --> of moments" in new
    assert "<!-- setting: imagenet-resampled-gib -->5.0 GiB<!-- /setting --> for" in new
    assert "<!-- setting: imagenet-pixels-gib -->1.0 GiB<!-- /setting --> for 49,800" in new
    target = tmp_path / "README.md"
    target.write_text(text, encoding="utf-8")
    monkeypatch.setattr(readme, "README", target)
    assert readme.main(["--check"]) == 1
    assert target.read_text(encoding="utf-8") == text
    err = capsys.readouterr().err
    for name in readme.SETTINGS:
        assert f"setting '{name}' differs from the constant it states" in err
    assert readme.main([]) == 0
    assert target.read_text(encoding="utf-8") == new


@pytest.mark.parametrize("edit, says", [
    (lambda t: t + "\nat <!-- setting: drift-alpha -->0.05<!-- /setting -->\n",
     "README setting 'drift-alpha' has no entry in paper/readme.py's SETTINGS"),
    (lambda t: t + "\nwith <!-- setting:drift-power -->80<!-- /setting --> % power\n",
     "'<!-- setting:drift-power -->' is not part of"),
    (lambda t: t + "\nwith <!-- setting: drift-power -->80\n<!-- /setting --> % power\n",
     "'<!-- setting: drift-power -->' is not part of"),
    (lambda t: t.replace("<!-- setting: compression-level -->95<!-- /setting -->", "95"),
     "setting 'compression-level' has no place in the README"),
])
def test_a_setting_that_is_never_written_is_named(tmp_path, monkeypatch, edit, says):
    """A misspelt marker would hold a hand-typed value that is never written nor checked."""
    broken = edit((REPO / "README.md").read_text(encoding="utf-8"))
    _, problems = readme.render(broken)
    assert any(says in p for p in problems), problems
    target = tmp_path / "README.md"
    target.write_text(broken, encoding="utf-8")
    monkeypatch.setattr(readme, "README", target)
    assert readme.main([]) == 1
    assert target.read_text(encoding="utf-8") == broken


def test_a_probe_that_could_not_tell_is_not_stated_as_not_saturating(tmp_path):
    """The AVX2 drift passage read the probe's saturates_pairs as true or else "not
    saturating": a probe that could not tell (None) was stated as a finding."""
    root = tmp_path / "record"
    shutil.copytree(readme.RECORDS, root)
    path = root / "drift-avx2" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["cpu"]["saturates_pairs"] = None
    path.write_text(json.dumps(manifest))
    text = "<!-- record: drift-time-avx2 -->\nold\n<!-- /record -->\n"
    out, problems = readme.render(text, root)
    assert out == text
    assert any("record drift-avx2: its kernel probe could not tell whether FBGEMM saturates"
               in p for p in problems), problems
