"""studies._common: run folders (manifest, atomicity), study_main, paired timing ratios."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qerror.files import name_max
from qerror.nn.models import Arch, Stem
from studies import _common
from studies._common import RunDir


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "study"
    with pytest.raises(RuntimeError):
        with RunDir(out, "demo", [], {}, force=True) as run:
            run.write_text("part.csv", "a,b\n")
            raise RuntimeError("interrupted")
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_finished_run_replaces_the_old_one_only_when_complete(tmp_path):
    out = tmp_path / "study"
    with RunDir(out, "demo", ["--x"], {"k": 1}, force=True) as run:
        run.write_text("a.txt", "first")
        run.finish()
    with pytest.raises(RuntimeError):
        with RunDir(out, "demo", [], {}, force=True) as run:
            run.write_text("a.txt", "second")
            raise RuntimeError
    assert (out / "a.txt").read_text() == "first"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["argv"] == ["--x"] and manifest["config"] == {"k": 1}
    assert manifest["packages"]["numpy"]


def test_study_main_flushes_denormals_for_its_body_only(monkeypatch):
    from qerror.cpu import flushing_denormals

    seen = []
    main = _common.study_main(lambda argv: seen.append((argv, flushing_denormals())) or 3)
    monkeypatch.setattr("sys.argv", ["prog", "--smoke"])
    assert main() == 3 and main(("--seed", "1")) == 3
    assert seen == [(["--smoke"], True), (["--seed", "1"], True)]
    assert not flushing_denormals()


@pytest.mark.parametrize("var, value", [("QERROR_FUSED", "off"), ("QERROR_LAYOUT", "nhwc")])
def test_study_main_refuses_an_unknown_package_switch_before_its_body(var, value, monkeypatch,
                                                                      capsys):
    """QERROR_FUSED=off stopped studies.drift, dataset, early_exit, seeds and rounding_choice
    with a ValueError's traceback at their first quantizer call, after their data and model
    were loaded; studies.rounding and train finished and published a manifest recording
    the value. Each study's main refuses it now, before its body runs."""
    ran = []
    main = _common.study_main(lambda argv: ran.append(argv) or 0)
    monkeypatch.setenv(var, value)
    assert main([]) == _common.EXIT_REFUSED and not ran
    assert f"error: {var}={value!r}" in capsys.readouterr().err
    monkeypatch.delenv(var)
    assert main([]) == 0 and ran == [[]]


def test_paired_ratio_alternates_and_divides():
    """The untimed warm-up pairs, then the timed ones, each side first in every other pair."""
    calls = []
    ratios, ta, tb = _common.paired_ratio(lambda: calls.append("a"), lambda: calls.append("b"),
                                          pairs=4, warmup=2)
    assert calls == ["a", "b"] * 2 + ["a", "b", "b", "a", "b", "a", "a", "b"]
    assert ratios.shape == ta.shape == tb.shape == (4,)
    np.testing.assert_array_equal(ratios, ta / tb)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_every_two_rounds_run_each_two_candidates_once_in_each_order_as_far_apart(n):
    """alternating_times' orders: each a permutation; in rounds 2m and 2m + 1, candidate b
    runs d places after a in one and d places before it in the other."""
    for m in range(2 * n + 1):
        first, second = (list(_common.round_order(n, i)) for i in (2 * m, 2 * m + 1))
        assert sorted(first) == sorted(second) == list(range(n))
        for a in range(n):
            for b in range(n):
                assert first.index(b) - first.index(a) == second.index(a) - second.index(b)
    assert [list(_common.round_order(3, i)) for i in range(6)] == [
        [0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 2, 1], [2, 0, 1], [1, 0, 2]]
    calls = []
    times = _common.alternating_times([lambda i, j=j: calls.append((i, j)) for j in range(n)],
                                      4)
    assert calls == [(i, int(j)) for i in range(4) for j in _common.round_order(n, i)]
    assert times.shape == (4, n) and (times >= 0).all()


def test_flush_denormal_restores_the_callers_setting():
    from qerror.cpu import flush_denormal, flushing_denormals, set_flush_denormal

    assert not flushing_denormals()
    with flush_denormal():
        assert flushing_denormals()
    assert not flushing_denormals()
    set_flush_denormal(True)
    try:
        with flush_denormal():
            assert flushing_denormals()
        assert flushing_denormals()
    finally:
        # qerror's setter, not torch's: the block put the caller's True back in the whole
        # OpenMP team, and torch's would turn off this thread only
        set_flush_denormal(False)


# --------------------------------------------------------------------------- output folders


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_an_out_whose_staging_names_would_be_too_long_is_refused_up_front(tmp_path):
    """A run is staged beside --out as .NAME.partial-PID (and kept as NAME.finished-PID), 10
    bytes and the process id longer than NAME: a legal --out that leaves no room for them
    passed check_out and failed with a raw "File name too long" when the run was staged,
    after a study's work. It is refused by check_out, naming the longest name that works;
    that one is staged, published and replaced."""
    limit = name_max(tmp_path)
    room = limit - len("..partial-") - _common.PID_DIGITS  # whatever the process id
    with pytest.raises(_common.StudyError, match=f"its name is {room + 1} bytes, .* over the "
                                                 f"{limit} bytes .* pass an --out whose name "
                                                 f"is at most {room} bytes"):
        _common.check_out(tmp_path / ("r" * (room + 1)), "demo", force=False)
    out = tmp_path / ("r" * room)
    for text in ("1\n", "2\n"):  # the second replaces the first (.NAME.old-PID)
        with RunDir(out, "demo", [], {}, force=True) as run:
            run.write_text("x.csv", text)
            run.finish()
    assert (out / "x.csv").read_text() == "2\n" and [p.name for p in tmp_path.iterdir()] == \
        [out.name]


def test_check_out_accepts_new_empty_and_forced_previous_runs(tmp_path):
    assert _common.check_out(tmp_path / "a" / "b", "demo", force=False) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # checked, not created
    (tmp_path / "empty").mkdir()
    assert _common.check_out(tmp_path / "empty", "demo", force=False) == tmp_path / "empty"
    with RunDir(tmp_path / "run", "demo", [], {}, force=True) as run:
        run.write_text("x.csv", "1\n")
        run.finish()
    with pytest.raises(_common.StudyError, match="previous run of the demo study; pass --force"):
        _common.check_out(tmp_path / "run", "demo", force=False)
    assert _common.check_out(tmp_path / "run", "demo", force=True) == tmp_path / "run"
    with pytest.raises(_common.StudyError, match="run of the 'demo' study, not of 'other'"):
        _common.check_out(tmp_path / "run", "other", force=True)


def test_the_folder_advised_instead_of_another_studys_run_is_beside_it(tmp_path):
    """The refusal advised a folder inside the other study's run (``--out RUN/other``):
    followed, that run held an item its manifest does not list, and its own study could no
    longer replace it with --force."""
    with RunDir(tmp_path / "run", "demo", [], {}, force=True) as run:
        run.write_text("x.csv", "1\n")
        run.finish()
    with pytest.raises(_common.StudyError) as refused:
        _common.check_out(tmp_path / "run", "other", force=True)
    assert str(refused.value).endswith(f"e.g. --out {tmp_path / 'other'}")
    (tmp_path / "other").mkdir()
    with pytest.raises(_common.StudyError, match="e.g. --out with a new folder$"):
        _common.check_out(tmp_path / "run", "other", force=True)
    # a user's folder: a new one inside it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(_common.StudyError) as refused:
        _common.check_out(tmp_path / "mine", "other", force=False)
    assert str(refused.value).endswith(f"e.g. --out {tmp_path / 'mine' / 'other'}")


def test_a_user_file_added_to_a_previous_run_is_never_replaced(tmp_path):
    with RunDir(tmp_path / "run", "demo", [], {}, force=True) as run:
        run.write_text("x.csv", "1\n")
        run.finish()
    (tmp_path / "run" / "sub").mkdir()
    (tmp_path / "run" / "sub" / "mine.txt").write_text("keep me")
    before = _files(tmp_path)
    with pytest.raises(_common.StudyError,
                       match=r"1 item\(s\) its manifest does not list \(sub/\)"):
        _common.check_out(tmp_path / "run", "demo", force=True)
    # Also when the file appears while a run is under way: finish refuses to replace it,
    # and keeps the finished run beside it, named in the message.
    kept = tmp_path / f"run2.finished-{os.getpid()}"
    with pytest.raises(_common.StudyError, match=f"not a run of a study.*complete at {kept}"):
        with RunDir(tmp_path / "run2", "demo", [], {}, force=True) as run:
            run.write_text("y.csv", "2\n")
            (tmp_path / "run2").mkdir()
            (tmp_path / "run2" / "notes.md").write_text("typed meanwhile")
            run.finish()
    assert {k: v for k, v in _files(tmp_path).items() if not k.startswith(kept.name)} == \
        {**before, "run2/notes.md": b"typed meanwhile"}
    assert (kept / "y.csv").read_text() == "2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run2", kept.name]


def test_a_file_of_a_previous_run_edited_since_is_never_replaced(tmp_path):
    """--force replaced a previous run whose listed files the user had edited since (a
    table touched up by hand): the edit was lost without a word
    (/work/runs/s55/data/p9_force_edited.py). Each listed file is held to the sha256 its
    manifest records, at the check before the work and again when the run is published."""
    out = tmp_path / "run"
    with RunDir(out, "demo", [], {}, force=True) as run:
        run.write_text("table.tex", "1\n")
        run.write_text("x.csv", "2\n")
        run.finish()
    (out / "table.tex").write_text("1 % edited for the camera-ready\n")
    before = _files(tmp_path)
    with pytest.raises(_common.StudyError) as refused:
        _common.check_out(out, "demo", force=True)
    assert str(refused.value) == (
        f"--out {out} holds a run of the demo study whose 1 file(s) table.tex changed since "
        "it wrote them (their sha256 is not the one its manifest.json records: edited by "
        "hand, or replaced); the changes would be lost, so it is not replaced, with --force "
        "neither. Copy them away, or pass another --out")
    assert _files(tmp_path) == before
    # edited while a run is under way: finish keeps the finished run beside it
    (out / "table.tex").write_text("1\n")
    kept = tmp_path / f"run.finished-{os.getpid()}"
    with pytest.raises(_common.StudyError, match=rf"1 file\(s\) x.csv changed.*complete at {kept}"):
        with RunDir(out, "demo", [], {}, force=True) as run:
            run.write_text("table.tex", "3\n")
            (out / "x.csv").write_text("2, and a note\n")
            run.finish()
    assert (out / "x.csv").read_text() == "2, and a note\n"
    assert (kept / "table.tex").read_text() == "3\n"


def test_stale_partial_folders_of_dead_processes_are_removed_and_only_those(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".run.partial-{dead_pid}"
    live = tmp_path / f".run.partial-{os.getppid()}"  # our parent is alive
    other_name = tmp_path / f".other.partial-{dead_pid}"
    not_ours = tmp_path / f".run.partial-{dead_pid}x"
    # a user's own folder that happens to have a staging folder's name: no study made it
    users = tmp_path / f".run.old-{dead_pid}"
    for folder in (stale, live, other_name, not_ours, users):
        folder.mkdir()
        (folder / "a.csv").write_text("1\n")
        if folder is not users:
            (folder / _common.STAGING_MARK).write_text("made by a study\n")
    link = tmp_path / f".run.partial-{dead_pid + 1}"
    link.symlink_to(other_name, target_is_directory=True)
    assert _common.clean_stale_partials(tmp_path / "run") == [stale]
    assert not stale.exists()
    for kept in (live, other_name, not_ours, link, users):
        assert kept.exists() or kept.is_symlink(), kept
    assert (other_name / "a.csv").read_text() == "1\n"
    assert (users / "a.csv").read_text() == "1\n"


def test_the_manifest_records_the_packages_environment_switches(tmp_path, monkeypatch):
    monkeypatch.setenv("QERROR_LAYOUT", "contiguous")
    monkeypatch.setenv("QERROR_FUSED", "0")
    with RunDir(tmp_path / "run", "demo", [], {}, force=False) as run:
        run.finish()
    env = json.loads((tmp_path / "run" / "manifest.json").read_text())["qerror_environment"]
    assert env["QERROR_LAYOUT"] == "contiguous" and env["QERROR_FUSED"] == "0"
    assert all(k.startswith("QERROR_") for k in env)


def test_a_runs_json_outputs_are_strict_json(tmp_path):
    """A study's JSON (its summary, its manifest) reads in any JSON reader: a float that is
    not finite is null there, not Python's bare NaN."""
    def refuse(word):
        raise ValueError(f"not JSON: {word}")

    with RunDir(tmp_path / "run", "demo", [], {"ratio": float("nan")}, force=False) as run:
        run.write_json("summary.json", {"recovered": float("nan"), "gain": float("inf"),
                                        "acc": 0.5})
        run.finish()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=refuse)
    assert summary == {"acc": 0.5, "gain": None, "recovered": None}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text(),
                          parse_constant=refuse)
    assert manifest["config"]["ratio"] is None


def test_a_staging_folder_is_marked_until_it_becomes_the_run(tmp_path):
    out = tmp_path / "run"
    with RunDir(out, "demo", [], {}, force=False) as run:
        assert (run.stage / _common.STAGING_MARK).is_file()
        run.write_text("x.csv", "1\n")
        run.finish()
    assert not (out / _common.STAGING_MARK).exists()
    assert _common.STAGING_MARK not in json.loads((out / "manifest.json").read_text())["outputs"]
    # a user's folder in the way of this process's staging folder is not removed
    mine = tmp_path / f".other.partial-{os.getpid()}"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    with pytest.raises(_common.StudyError, match="not made by a study"):
        RunDir(tmp_path / "other", "demo", [], {}, force=False)
    assert (mine / "notes.txt").read_text() == "mine\n"


def test_goals_table_wraps_its_two_text_columns_at_fixed_widths(tmp_path):
    import pandas as pd

    goals = pd.DataFrame({"goal": ["a long goal_name"], "measured": ["1.5% of it"],
                          "verdict": ["met"]})
    with RunDir(tmp_path / "run", "demo", [], {}, force=True) as run:
        text = run.write_goals_table("goals.tex", goals, "Goals.", "tab:g").read_text()
        with pytest.raises(ValueError, match="three columns"):
            run.write_goals_table("bad.tex", goals.assign(extra=1), "Goals.", "tab:b")
    wrap = ">{\\raggedright\\arraybackslash}p{%s\\linewidth}"
    assert f"\\begin{{tabular}}{{{wrap % 0.33}{wrap % 0.45}{wrap % 0.12}}}" in text
    assert "a long goal name & 1.5\\% of it & met" in text  # escaped as every table is


def test_a_mount_point_as_out_is_refused_before_any_work(tmp_path, monkeypatch):
    """A container's volume given as --out cannot be moved into place; refused up front
    (it used to fail only after the whole run, which then deleted its output)."""
    vol = tmp_path / "vol"
    vol.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(_common.os.path, "ismount", lambda p: Path(p) == vol or real(p))
    with pytest.raises(_common.StudyError, match=f"is a mount point.*--out {vol / 'demo'}"):
        _common.check_out(vol, "demo", force=False)
    assert _common.check_out(vol / "demo", "demo", force=False) == vol / "demo"


def test_an_out_that_is_a_loop_of_links_is_refused_with_the_reason(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(_common.StudyError, match="loop of symbolic links"):
        _common.check_out(tmp_path / "a", "demo", force=False)


def test_a_run_that_appears_at_out_meanwhile_is_never_replaced(tmp_path, monkeypatch):
    """Two runs aimed at a new --out, neither forced: the one that finishes second finds
    the first's run there and keeps its own beside it, named, instead of replacing it."""
    out = tmp_path / "run"
    with RunDir(out, "demo", ["--seed", "2"], {}, force=False) as second:
        with monkeypatch.context() as m:
            m.setattr(os, "getpid", os.getppid)  # another process, staged apart
            with RunDir(out, "demo", ["--seed", "1"], {}, force=False) as first:
                first.write_text("x.csv", "first\n")
                first.finish()
        second.write_text("x.csv", "second\n")
        kept = tmp_path / f"run.finished-{os.getpid()}"
        with pytest.raises(_common.StudyError, match="another run was written to --out"):
            second.finish()
    assert (out / "x.csv").read_text() == "first\n"
    assert (kept / "x.csv").read_text() == "second\n"
    # every study passes its --force (a study makes its RunDir after its work): without it
    # a run now at --out is refused before anything is staged
    with pytest.raises(_common.StudyError, match="holds a previous run"):
        RunDir(out, "demo", [], {}, force=False)
    assert not list(tmp_path.glob(".run.partial-*"))
    # a run that found a previous one when it started (the study checked --force) replaces it
    with RunDir(out, "demo", ["--seed", "3"], {}, force=True) as third:
        third.write_text("x.csv", "third\n")
        third.finish()
    assert (out / "x.csv").read_text() == "third\n"


def test_a_run_whose_staging_folder_was_removed_while_it_worked_publishes_nothing(tmp_path):
    """Its staging folder removed while it worked (by hand; by a run aimed at the same --out
    on another machine or in another container, to which this process is not alive), the
    next write made the folder again and the run was published with the later files alone,
    under a manifest that listed just those: a run that looked complete."""
    out = tmp_path / "run"
    removed = "staging folder .* was removed while the run worked"
    with pytest.raises(_common.StudyError, match=removed):
        with RunDir(out, "demo", [], {}, force=False) as run:
            run.write_text("a.csv", "1\n")
            shutil.rmtree(run.stage)
            run.write_text("b.csv", "2\n")
    assert not list(tmp_path.iterdir())
    # removed after the last write, and a folder made at its place (not the run's): nothing
    # is published, and that folder is left as it is
    with pytest.raises(_common.StudyError, match=removed):
        with RunDir(out, "demo", [], {}, force=False) as run:
            run.write_text("a.csv", "1\n")
            shutil.rmtree(run.stage)
            run.stage.mkdir()
            (run.stage / "b.csv").write_text("theirs\n")
            run.finish()
    assert not out.exists()
    assert (run.stage / "b.csv").read_text() == "theirs\n"


def test_ctrl_c_while_the_replaced_run_is_removed_says_the_new_one_is_published(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with RunDir(out, "demo", [], {}, force=True) as run:
        run.write_text("x.csv", "old\n")
        run.finish()
    real_rmtree = _common.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if ".old-" in Path(path).name:
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    def body(argv):
        with RunDir(out, "demo", [], {}, force=True) as run:
            run.write_text("x.csv", "new\n")
            run.finish()
        return 0

    monkeypatch.setattr(_common.shutil, "rmtree", rmtree)
    assert _common.study_main(body)([]) == _common.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted after the run was published" in err and "nothing was" not in err
    assert (out / "x.csv").read_text() == "new\n"
    old = tmp_path / f".run.old-{os.getpid()}"
    assert old.is_dir()
    monkeypatch.setattr(_common.shutil, "rmtree", real_rmtree)
    monkeypatch.setattr(_common, "process_alive", lambda pid: False)  # as after this process ends
    assert _common.clean_stale_partials(out) == [old]


def test_a_finished_run_that_cannot_be_moved_is_kept_and_named(tmp_path, monkeypatch):
    """When the last move fails (a mount point, a vanished parent), the complete run stays,
    under a name no later run removes, and the previous run at --out is put back."""
    out = tmp_path / "run"
    with RunDir(out, "demo", [], {}, force=True) as run:
        run.write_text("x.csv", "old\n")
        run.finish()
    before = _files(out)
    real_rename = Path.rename

    def rename(self, target):
        if Path(target) == out and ".partial-" in self.name:
            raise OSError(16, "Device or resource busy")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    kept = tmp_path / f"run.finished-{os.getpid()}"
    with pytest.raises(_common.StudyError, match=f"it is complete at {kept}"):
        with RunDir(out, "demo", [], {}, force=True) as run:
            run.write_text("x.csv", "new\n")
            run.finish()
    assert _files(out) == before  # the previous run is back in place
    assert (kept / "x.csv").read_text() == "new\n"
    assert json.loads((kept / "manifest.json").read_text())["outputs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", kept.name]
    assert _common.clean_stale_partials(out) == []  # not a stale staging folder


def test_a_finished_run_stays_in_its_staging_folder_when_no_rename_works(tmp_path, monkeypatch):
    """A parent that refuses every rename (read-only, full): the run stays where it was
    staged, is not removed on the way out, unmarked (no later run removes it), and the
    message says where it is."""
    out = tmp_path / "run"

    def refuse(self, target):
        raise OSError(30, "Read-only file system")

    with pytest.raises(_common.StudyError, match="which no later run removes"):
        with RunDir(out, "demo", [], {}, force=True) as run:
            run.write_text("x.csv", "1\n")
            stage = run.stage
            monkeypatch.setattr(Path, "rename", refuse)
            run.finish()
    monkeypatch.undo()
    assert (stage / "x.csv").read_text() == "1\n" and (stage / "manifest.json").exists()
    assert not out.exists()
    monkeypatch.setattr(_common, "process_alive", lambda pid: False)
    assert _common.clean_stale_partials(out) == [] and stage.is_dir()


def test_held_out_is_the_split_a_checkpoint_was_trained_beside():
    """The recipe's held-out sizes (a smoke checkpoint holds out 64 and 32 images), the
    library's defaults where none are recorded; never the training seed, since
    studies.train splits with seed 0 whatever it trains with."""
    from types import SimpleNamespace

    from qerror import data
    from qerror.files import jsonable
    from qerror.nn.models import Arch, Stem
    from studies.train import default_recipe

    smoke = jsonable(default_recipe(Arch.RESNET18, Stem.IMAGENET, smoke=True, seed=7))
    assert _common.held_out(SimpleNamespace(config={"recipe": smoke})) == {"val": 64,
                                                                            "calib": 32}
    default = jsonable(default_recipe(Arch.RESNET50, Stem.IMAGENET, seed=1))
    assert _common.held_out(SimpleNamespace(config={"recipe": default})) == {
        "val": data.VAL_IMAGES, "calib": data.CALIB_IMAGES}
    for config in ({}, None, {"recipe": None}):
        assert _common.held_out(SimpleNamespace(config=config)) == {
            "val": data.VAL_IMAGES, "calib": data.CALIB_IMAGES}
    # The held-out images are those training held out: the same split, whatever the seed.
    assert "seed" not in _common.held_out(SimpleNamespace(config={"recipe": default}))


def test_a_run_records_the_commit_it_started_from(tmp_path, monkeypatch):
    """The code that ran is the commit checked out when the study started; a commit made
    while it ran is recorded beside it, not in its place."""
    states = iter([{"commit": "a" * 40, "dirty": False}] + [{"commit": "b" * 40,
                                                            "dirty": False}] * 5)
    monkeypatch.setattr(_common, "git_identity", lambda: next(states))

    def body(argv):
        with RunDir(tmp_path / "run", "demo", argv, {}, force=True) as run:
            run.write_text("x.txt", "x\n")
            run.finish()
        return 0

    assert _common.study_main(body)([]) == 0
    git = json.loads((tmp_path / "run" / "manifest.json").read_text())["git"]
    assert git == {"commit": "a" * 40, "dirty": False,
                   "at_finish": {"commit": "b" * 40, "dirty": False}}
    assert _common._GIT_AT_START is None


def test_a_run_times_the_whole_study_not_only_its_writing(tmp_path, monkeypatch):
    """A study that opens its RunDir after its work (the drift study does) records the
    whole study's seconds from when study_main started it; a RunDir opened outside a study
    times itself."""
    clock = [1000.0]
    monkeypatch.setattr(_common.time, "time", lambda: clock[0])

    def body(argv):
        clock[0] += 60.0  # the study's work, before its folder is opened
        with RunDir(tmp_path / "run", "demo", argv, {}, force=True) as run:
            run.write_text("x.txt", "x\n")
            clock[0] += 1.5  # writing
            run.finish()
        return 0

    assert _common.study_main(body)([]) == 0
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (m["started_unix"], m["seconds"]) == (1000.0, 61.5)
    assert _common._STARTED_AT is None
    with RunDir(tmp_path / "alone", "demo", [], {}, force=False) as run:
        clock[0] += 2.0
        run.finish()
    m = json.loads((tmp_path / "alone" / "manifest.json").read_text())
    assert (m["started_unix"], m["seconds"]) == (1061.5, 2.0)


@pytest.mark.parametrize("recipe", [{"val_split": None}, {"calib_split": "64"},
                                    {"val_split": -1}, {"val_split": True}])
def test_held_out_refuses_a_recipe_it_cannot_read(recipe):
    from types import SimpleNamespace

    with pytest.raises(_common.StudyError, match="not a number of images"):
        _common.held_out(SimpleNamespace(config={"recipe": recipe}, path="m.pt"))
    # a config that holds no training recipe at all: the defaults
    for config in ({"recipe": "foo"}, {"recipe": [1]}, "foo"):
        assert _common.held_out(SimpleNamespace(config=config)) == _common.held_out(
            SimpleNamespace(config={}))


def test_sigterm_is_taken_as_ctrl_c_and_leaves_no_temporary_file(tmp_path):
    """A study killed with SIGTERM (timeout, a batch system) while it writes a file cleans up
    as Ctrl-C does: its temporary file is removed, nothing published, exit status 130. With
    Ctrl-C ignored (a shell's background job) SIGTERM keeps its own action."""
    import signal
    import subprocess
    import sys

    script = f"""
import os, signal, sys, time
from pathlib import Path
from qerror.files import atomic_write
from studies import _common

def body(argv):
    def write(tmp):
        tmp.write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    atomic_write(Path({str(tmp_path)!r}) / "ckpt.pt", write)
    return 0

# each case sets Ctrl-C's action itself: a test run launched as a background job inherits
# it ignored, and Python then leaves it so
signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[1] == "ignore"
              else signal.default_int_handler)
sys.exit(_common.study_main(body)([]))
"""
    run = subprocess.run([sys.executable, "-c", script, "default"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == _common.EXIT_INTERRUPTED, run.stderr
    assert "interrupted" in run.stderr
    assert list(tmp_path.iterdir()) == []
    run = subprocess.run([sys.executable, "-c", script, "ignore"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == -signal.SIGTERM


def test_check_trained_on_refuses_other_data_than_the_checkpoint_recorded(tmp_path,
                                                                          monkeypatch):
    """Another copy of images in Fashion-MNIST's format was measured against the baseline
    without a word (and its held-out splits could hold training images): each split's
    sha256 is compared with what studies.train recorded."""
    from types import SimpleNamespace

    from qerror import data

    sizes = {"train": 120, "test": 30}
    monkeypatch.setattr(data, "SIZES", sizes)
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    rng = np.random.default_rng(3)
    arrays = {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, n, dtype=np.uint8)) for split, n in sizes.items()}

    def folder(name, change=None):
        root = tmp_path / name
        root.mkdir()
        for split, (images, labels) in arrays.items():
            images = images.copy()
            if split == change:
                images[-1, 0, 0] ^= 1  # one pixel of the last image
            data.write_idx(root / f"{data.FILES[split][0]}.gz", images)
            data.write_idx(root / f"{data.FILES[split][1]}.gz", labels)
        return root

    same = folder("same")
    recipe = {"val_split": 20, "calib_split": 10, "test_images": None}
    splits = data.fashion_mnist_splits(same, val=20, calib=10)
    recorded = {"source": str(same), "train_sha256": splits.train.sha256,
                "val_sha256": splits.val.sha256, "test_sha256": splits.test.sha256}
    info = SimpleNamespace(config={"recipe": recipe, "data": recorded}, path="m.pt")
    _common.check_trained_on(info, same)  # the data it was trained on
    _common.check_trained_on(info, folder("copy"))  # the same images elsewhere
    with pytest.raises(_common.StudyError, match=r"its test split differs.*--data-root.*"
                                                 r"--checkpoint NEW_FILE and pass "
                                                 r"--checkpoint NEW_FILE$"):
        _common.check_trained_on(info, folder("test", change="test"))
    # a study whose option for a checkpoint has another name (drift's --weights), or that
    # reads the cache's baseline only (rounding_choice): each was told to pass --checkpoint
    with pytest.raises(_common.StudyError, match=r"and pass --weights NEW_FILE$"):
        _common.check_trained_on(info, folder("test2", change="test"), use="--weights")
    with pytest.raises(_common.StudyError, match=r"retrain the cached baseline on this folder "
                                                 r"with python -m studies.train --data-root "
                                                 r"FOLDER --force \(it replaces"):
        _common.check_trained_on(info, folder("test3", change="test"), use=None)
    cached = SimpleNamespace(**vars(info), arch=Arch.RESNET18, stem=Stem.CIFAR)
    with pytest.raises(_common.StudyError, match=r"python -m studies.train --arch resnet18 "
                                                 r"--stem cifar --data-root FOLDER --force"):
        _common.check_trained_on(cached, folder("test4", change="test"), use=None)
    # the last training image lies in the training split or in a held-out one
    with pytest.raises(_common.StudyError, match="train|validation"):
        _common.check_trained_on(info, folder("train", change="train"))
    # a smoke checkpoint tested on the first images: those are compared
    first = {**recorded, "test_sha256": splits.test.subset(np.arange(5)).sha256}
    _common.check_trained_on(SimpleNamespace(config={"recipe": {**recipe, "test_images": 5},
                                                     "data": first}, path="m.pt"), same)
    # nothing recorded, or nothing to read: not this check's to refuse
    _common.check_trained_on(SimpleNamespace(config={"recipe": recipe}, path="m.pt"),
                             folder("none", change="test"))
    _common.check_trained_on(info, tmp_path / "missing")


def _python_handles_sigint() -> bool:
    import signal
    import threading

    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


@pytest.mark.skipif(not _python_handles_sigint(),
                    reason="counted only in the main thread under Python's own handler")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_ctrl_c_that_something_swallowed_is_not_lost(tmp_path, capsys, when):
    """A SIGINT whose KeyboardInterrupt Python drops (raised in a weak-reference callback:
    "Exception ignored in ...") let an early_exit run go on, publish and exit 0. Counted, it
    stops the run before it is published; after publishing, the exit says so."""
    import signal
    import weakref

    out = tmp_path / "run"

    class Thing:
        pass

    def swallowed():
        thing = Thing()
        ref = weakref.ref(thing, lambda r: signal.raise_signal(signal.SIGINT))
        del thing  # the callback raises KeyboardInterrupt, which Python prints and drops
        return ref

    went_on = []

    def body(argv):
        with RunDir(out, "demo", [], {}, force=True) as run:
            run.write_text("x.csv", "x\n")
            if when == "before":
                swallowed()
                time.sleep(30)  # the dropped Ctrl-C is sent again and cuts this short
                went_on.append(True)
            run.finish()
        if when == "after":
            swallowed()
            time.sleep(30)
            went_on.append(True)
        return 0

    hook = sys.unraisablehook
    assert _common.study_main(body)([]) == _common.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert not went_on  # stopped at once (before: ran on to the publishing step)
    if when == "before":
        assert "nothing was published" in err and not out.exists()
        assert not list(tmp_path.glob(".run.partial-*"))
    else:
        assert f"interrupted after the run was published: it is complete at {out}" in err
        assert (out / "x.csv").read_text() == "x\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert sys.unraisablehook is hook


def test_two_forced_runs_at_one_out_never_replace_each_others_run(tmp_path, monkeypatch):
    """Two runs started with --force while one previous run was at --out: the first to
    finish replaces it; the second finds another run than the one it was allowed to replace,
    leaves it, and keeps its own beside it, named."""
    out = tmp_path / "run"
    with RunDir(out, "demo", ["--seed", "0"], {}, force=True) as run:
        run.write_text("x.csv", "previous\n")
        run.finish()
    with RunDir(out, "demo", ["--seed", "2"], {}, force=True) as second:
        with monkeypatch.context() as m:
            m.setattr(os, "getpid", os.getppid)  # another process, staged apart
            with RunDir(out, "demo", ["--seed", "1"], {}, force=True) as first:
                first.write_text("x.csv", "first\n")
                first.finish()
        second.write_text("x.csv", "second\n")
        with pytest.raises(_common.StudyError, match="another run was written to --out"):
            second.finish()
    assert (out / "x.csv").read_text() == "first\n"
    assert (tmp_path / f"run.finished-{os.getpid()}" / "x.csv").read_text() == "second\n"


@pytest.mark.parametrize("what", ["empty folder", "named pipe"])
def test_a_previous_run_is_not_replaced_over_a_folder_or_pipe_it_does_not_list(tmp_path, what):
    """Replacing a run removes its whole folder: an empty folder, or a named pipe, that the
    user put there is as much theirs as a file, and refused as one."""
    out = tmp_path / "run"
    with RunDir(out, "demo", [], {}, force=True) as run:
        run.write_text("sub/x.csv", "1\n")
        run.finish()
    _common.check_out(out, "demo", force=True)  # the run's own folders are its own
    if what == "empty folder":
        (out / "sub" / "mine").mkdir()
        shown = "sub/mine/"
    else:
        os.mkfifo(out / "pipe")
        shown = "pipe"
    with pytest.raises(_common.StudyError, match=rf"1 item\(s\) its manifest does not list "
                                                 rf"\({shown}\)"):
        _common.check_out(out, "demo", force=True)


def _publish_with_rename(tmp_path, rename: str):
    """A run (x.csv = "old") at ``tmp_path / "run"``, then, in a fresh Python process under
    study_main with Ctrl-C's default handler, a study that writes x.csv = "new" there after
    ``Path.rename`` is replaced by the function ``rename`` (its source: ``real_rename``,
    ``out``, ``os`` and ``signal`` are there); ``out`` and the finished process."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "run"
    with RunDir(out, "demo", [], {}, force=True) as run:
        run.write_text("x.csv", "old\n")
        run.finish()

    script = textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        from studies import _common

        out = Path(OUT)
        real_rename = Path.rename
        RENAME

        def body(argv):
            with _common.RunDir(out, "demo", [], {}, force=True) as run:
                run.write_text("x.csv", "new\\n")
                Path.rename = rename
                run.finish()
            return 0

        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.exit(_common.study_main(body)([]))
        """).replace("OUT", repr(str(out))).replace("RENAME", textwrap.dedent(rename).strip())
    return out, subprocess.run([sys.executable, "-c", script], capture_output=True,
                               text=True, timeout=120)


def test_ctrl_c_between_the_two_renames_leaves_the_new_run_published(tmp_path):
    """A Ctrl-C that arrives after the previous run was moved aside and before the new one
    took its place waits for the move: the new run is at --out, complete, the previous
    one removed, and the exit says it was published."""
    out, done = _publish_with_rename(tmp_path, """
def rename(self, target):
    moved = real_rename(self, target)
    if self == out:  # the previous run, moved aside
        os.kill(os.getpid(), signal.SIGINT)
    return moved
""")
    assert done.returncode == _common.EXIT_INTERRUPTED, done.stderr
    assert "interrupted after the run was published: it is complete at" in done.stderr
    assert (out / "x.csv").read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_forced_run_published_just_before_the_move_is_never_removed(tmp_path, monkeypatch):
    """Two --force runs: the first publishes in the instant between the second's check and
    its move of --out aside. The second moves first, then checks what it moved: not the run
    it was allowed to replace, so it puts it back and keeps its own beside it (it once
    removed the first's run with the previous one's copy)."""
    out = tmp_path / "run"
    with RunDir(out, "demo", [], {}, force=True) as run:
        run.write_text("x.csv", "previous\n")
        run.finish()
    pid = {"now": 222}
    monkeypatch.setattr(_common.os, "getpid", lambda: pid["now"])
    monkeypatch.setattr(_common, "process_alive", lambda p: True)  # both runs' folders are live
    second = RunDir(out, "demo", [], {}, force=True)
    second.write_text("x.csv", "second\n")
    pid["now"] = 111
    first = RunDir(out, "demo", [], {}, force=True)
    first.write_text("x.csv", "first\n")
    pid["now"] = 222
    real_rename = Path.rename
    raced = []

    def rename(self, target):
        if self == out and ".old-222" in Path(target).name and not raced:
            raced.append(1)
            pid["now"] = 111
            first.finish()  # the other run publishes now
            pid["now"] = 222
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(_common.StudyError, match="another run was written to --out"):
        second.finish()
    assert raced and (out / "x.csv").read_text() == "first\n"
    assert (tmp_path / "run.finished-222" / "x.csv").read_text() == "second\n"


def test_a_held_ctrl_c_does_not_hide_a_failed_move(tmp_path):
    """The last rename fails (a full disk) while a Ctrl-C is held: the finished run is kept
    beside --out and the previous run put back, and the message says where, instead of the
    held Ctrl-C replacing the failure (both runs were then lost)."""
    out, done = _publish_with_rename(tmp_path, """
def rename(self, target):
    if ".partial-" in self.name and Path(target) == out:
        os.kill(os.getpid(), signal.SIGINT)
        raise OSError(28, "No space left on device")
    return real_rename(self, target)
""")
    assert done.returncode == _common.EXIT_REFUSED, done.stderr
    assert "could not be moved to --out" in done.stderr and "complete at" in done.stderr
    assert (out / "x.csv").read_text() == "old\n"
    kept = [p for p in tmp_path.iterdir() if ".finished-" in p.name]
    assert len(kept) == 1 and (kept[0] / "x.csv").read_text() == "new\n"


def test_a_run_killed_while_it_finishes_leaves_a_folder_the_next_run_removes(tmp_path):
    """Killed (SIGKILL, out of memory) while finish() hashes and writes the manifest, the
    staging folder keeps its mark, and the next run aimed at --out removes it."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "results"
    child = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from studies import _common
        _common.kernel_probe = lambda *a, **k: os._exit(9)  # killed mid-finish
        with _common.RunDir(Path({str(out)!r}), "demo", [], {{}}, force=False) as run:
            run.write_text("a.txt", "x")
            run.finish()
    """)
    got = subprocess.run([sys.executable, "-c", child], cwd=Path(__file__).parents[2])
    assert got.returncode == 9
    left, = tmp_path.glob(".results.partial-*")
    assert (left / _common.STAGING_MARK).is_file()
    assert _common.clean_stale_partials(out) == [left]


def test_a_previous_run_that_cannot_be_put_back_is_never_removed_as_left_behind(
        tmp_path, monkeypatch):
    """The previous run moved aside, then another run published at --out before this one:
    the previous run stays where the message says, unmarked, and the next run leaves it."""
    out = tmp_path / "results"
    with RunDir(out, "demo", ["--prev"], {}, force=False) as run:
        run.write_text("prev.txt", "previous\n")
        run.finish()
    real = Path.rename

    def rename(self, target):
        if self.name.startswith(".results.partial") and Path(target) == out:
            out.mkdir()
            (out / "other.txt").write_text("x")  # another run published at this moment
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(_common.StudyError, match="moved to .*could not be put back"):
        with RunDir(out, "demo", ["--new"], {}, force=True) as run:
            run.write_text("new.txt", "new\n")
            run.finish()
    monkeypatch.setattr(Path, "rename", real)
    old, = tmp_path.glob(".results.old-*")
    monkeypatch.setattr(_common, "process_alive", lambda pid: False)  # as after this process ends
    assert _common.clean_stale_partials(out) == []
    assert (old / "prev.txt").read_text() == "previous\n"
    assert not (tmp_path / f"results.finished-{os.getpid()}" / _common.STAGING_MARK).exists()


def _replacing(out: Path):
    """A study's main that publishes a new run over ``out`` (``--force``)."""
    def body(argv):
        with RunDir(out, "demo", ["--new"], {}, force=True) as run:
            run.write_text("new.txt", "new\n")
            run.finish()
        return 0
    return body


def test_a_replaced_runs_copy_cut_short_while_removed_stays_marked(tmp_path, monkeypatch,
                                                                   capsys):
    """Ctrl-C after some of the previous run's copy is removed: its mark goes last, so the
    next run removes the rest, as the message says."""
    out = tmp_path / "results"
    with RunDir(out, "demo", [], {}, force=False) as run:
        for i in range(5):
            run.write_text(f"f{i}.txt", "x\n")
        run.finish()
    real = Path.unlink
    calls = []

    def unlink(self, *a, **k):
        if ".old-" in str(self.parent) and self.name.startswith("f"):
            calls.append(self.name)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert _common.study_main(_replacing(out))([]) == _common.EXIT_INTERRUPTED
    assert f"the next run aimed at {out} removes it" in capsys.readouterr().err
    monkeypatch.setattr(Path, "unlink", real)
    old, = tmp_path.glob(".results.old-*")
    assert (old / _common.STAGING_MARK).is_file()
    monkeypatch.setattr(_common, "process_alive", lambda pid: False)
    assert _common.clean_stale_partials(out) == [old]
    assert (out / "new.txt").read_text() == "new\n"


def test_given_options_are_those_the_command_line_gives_whatever_their_defaults():
    import argparse

    from studies._common import given_options

    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=6)
    parser.add_argument("--names", nargs="*", default=None)
    parser.add_argument("--flag", action="store_true")
    for argv, given in (([], set()), (["--width", "6"], {"width"}),  # a default given counts
                        (["--names"], {"names"}), (["--flag", "--width=3"], {"flag", "width"})):
        assert given_options(parser, argv, parser.parse_args(argv)) == given, argv
    parser.add_argument("-v", action="count", default=0)
    with pytest.raises(TypeError, match="append, count or extend option"):
        given_options(parser, ["-v"], parser.parse_args(["-v"]))


def test_publish_folder_swaps_a_staged_folder_in_whole(tmp_path, monkeypatch):
    final = tmp_path / "generated"
    final.mkdir()
    (final / "old.txt").write_text("old\n")
    stage = _common.staging_folder(final)
    assert stage.name == f".generated.partial-{os.getpid()}"
    assert (stage / _common.STAGING_MARK).is_file()
    (stage / "new.txt").write_text("new\n")
    assert _common.publish_folder(stage, final) == final
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]  # unmarked: published
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generated"]  # the old one gone
    # the second rename fails: the previous folder is put back, the stage stays marked
    stage = _common.staging_folder(final)
    real = Path.rename

    def rename(self, target):
        if self == stage:
            raise OSError(28, "No space left on device")
        return real(self, target)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError):
        _common.publish_folder(stage, final)
    monkeypatch.setattr(Path, "rename", real)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert (stage / _common.STAGING_MARK).is_file()
    # a link is never replaced
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(_common.StudyError, match="symbolic link"):
        _common.publish_folder(stage, link)


def test_a_row_of_panels_is_never_drawn_much_wider_than_it_prints():
    """Three 4.2-inch panels printed at 0.85 of the text width were 12.6 inches wide, and
    their text printed at under half its size."""
    from studies._common import PRINT_WIDTH, row_width

    assert row_width(1, 4.2, 0.85) == 4.2
    assert row_width(3, 4.2, 0.85) == pytest.approx(1.15 * 0.85 * PRINT_WIDTH)
    assert 0.85 * PRINT_WIDTH / row_width(6, 3.0, 0.85) >= 1 / 1.15 - 1e-12


def test_a_previous_run_left_aside_by_a_killed_publish_is_put_back_not_removed(tmp_path,
                                                                               monkeypatch):
    """Killed between its two renames, a publish left the previous folder marked beside
    --out and nothing at --out: the next run's clean-up deleted it."""
    final = tmp_path / "results"
    old = tmp_path / ".results.old-99999"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    (old / _common.STAGING_MARK).write_text("")
    new = tmp_path / ".results.partial-99999"  # the new run, not yet renamed, unmarked
    new.mkdir()
    (new / "manifest.json").write_text("{}")
    monkeypatch.setattr(_common, "process_alive", lambda pid: False)
    assert _common.clean_stale_partials(final) == []
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json"] and not old.exists()
    assert (new / "manifest.json").is_file()
    # with a folder at --out the copy is a replaced run's, removed as before
    old.mkdir()
    (old / _common.STAGING_MARK).write_text("")
    assert _common.clean_stale_partials(final) == [old] and not old.exists()


def test_a_replaced_runs_copy_cut_short_while_removed_is_never_put_back(tmp_path):
    """Killed while it removed the replaced run's copy, once the new run was published; the
    user then moved the new run away: the next run put the copy, some of its files gone
    and its manifest kept, back at --out, a run that looked complete."""
    out = tmp_path / "run"
    with RunDir(out, "demo", [], {}, force=False) as run:
        for name in ("a.csv", "b.csv"):
            run.write_text(name, "previous\n")
        run.finish()
    old = tmp_path / ".run.old-99999"  # what the killed removal left of it
    out.rename(old)
    (old / "a.csv").unlink()
    (old / _common.STAGING_MARK).write_text("made by a qerror study\n")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_common, "process_alive", lambda pid: False)
        assert _common.clean_stale_partials(out) == [old]
    assert not list(tmp_path.iterdir())


def test_a_folder_of_one_entry_is_named_in_the_singular(tmp_path):
    """'--out ... holds 1 entries' (the safety review's note): the count takes its noun's
    number."""
    one = tmp_path / "one"
    one.mkdir()
    (one / "thesis.tex").write_text("mine")
    with pytest.raises(_common.StudyError, match=r"holds 1 entry \(thesis\.tex\) and is not"):
        _common.check_out(one, "demo", force=False)
    (one / "notes.txt").write_text("mine")
    with pytest.raises(_common.StudyError, match=r"holds 2 entries \(notes\.txt, thesis\.tex\)"):
        _common.check_out(one, "demo", force=False)
    assert (one / "thesis.tex").read_text() == "mine"


def test_a_99th_percentile_is_reported_from_100_timings_and_a_maximum_is_called_one():
    rng = np.random.default_rng(0)
    t = rng.exponential(1e-3, 200)
    # numpy's interpolated 99th percentile of 15 timings is 0.86 of the largest one
    assert np.isnan(_common.p99(t[:99]))
    assert _common.p99(t[:100]) == np.percentile(t[:100], 99) < t[:100].max()
    assert _common.tail_note(t[:15], t[15:30]) == (
        f"max {1e3 * t[:15].max():.2f} vs {1e3 * t[15:30].max():.2f} ms")
    assert _common.tail_note(t[:100], t[100:]) == (
        f"p99 {1e3 * np.percentile(t[:100], 99):.2f} vs "
        f"{1e3 * np.percentile(t[100:], 99):.2f} ms")


def test_an_out_that_became_a_link_while_the_study_ran_is_never_emptied(tmp_path):
    """The previous run moved elsewhere and linked back at --out while the study ran:
    finish() moved the link aside as if it were the run, published the new run, then
    emptied the link's target (the previous run, wherever it now lies) and failed on the
    link. A link at --out is left as it is, as publish_folder leaves one, and the run kept."""
    out = tmp_path / "run"
    with RunDir(out, "demo", [], {}, force=True) as run:
        run.write_text("x.csv", "old\n")
        run.finish()
    before = _files(out)
    run = RunDir(out, "demo", [], {}, force=True)
    run.write_text("x.csv", "new\n")
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    out.symlink_to(moved)
    with pytest.raises(_common.StudyError, match="symbolic link"):
        with run:
            run.finish()
    assert out.is_symlink() and _files(moved) == before
    assert (tmp_path / f"run.finished-{os.getpid()}" / "x.csv").read_text() == "new\n"


def test_publish_folder_says_a_failed_move_though_a_ctrl_c_waited(tmp_path):
    """The paper build's publish: the last rename fails (a full disk) while a Ctrl-C is
    held. RunDir.finish said the failure; publish_folder, its copy, raised the held Ctrl-C
    in its place, so the build said it was interrupted, not that it could not write."""
    import subprocess
    import sys
    import textwrap

    final = tmp_path / "generated"
    final.mkdir()
    (final / "old.txt").write_text("old\n")
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from studies import _common

        final = Path({str(final)!r})
        stage = _common.staging_folder(final)
        real = Path.rename

        def rename(self, target):
            if self == stage:
                os.kill(os.getpid(), signal.SIGINT)
                raise OSError(28, "No space left on device")
            return real(self, target)

        Path.rename = rename
        try:
            _common.publish_folder(stage, final)
        except OSError as err:
            print("OSError", err.errno, (stage / _common.STAGING_MARK).is_file())
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["OSError", "28", "True"], done.stderr
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]


def _can_write_in_read_only_folders(tmp_path) -> bool:
    """Whether this process writes in a folder of mode 0o555 all the same (root)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").write_text("x")
        return True
    except PermissionError:
        return False
    finally:
        probe.chmod(0o755)


@pytest.mark.parametrize("refusal", ["played", "kernel"])
@pytest.mark.parametrize("where", ["empty out", "run's subfolder", "unlistable subfolder"])
def test_an_out_the_run_cannot_empty_is_refused_before_any_work(tmp_path, monkeypatch, where,
                                                                refusal, unlistable):
    """An empty read-only --out, or a previous run holding a read-only folder, passed
    check_out: the study did all its work, and then the empty folder could not be marked
    (the run kept beside it, exit 2), or the new run was published and the old copy's
    removal failed (a bare 'Permission denied: b.txt', exit 1, the copy left beside it, and
    the next run's clean-up failed the same way). Root writes in every folder: the kernel's
    refusal is played by mkstemp and scandir, or, run as a user, is the kernel's own."""
    import tempfile

    if refusal == "kernel" and _can_write_in_read_only_folders(tmp_path):
        pytest.skip("this process writes in read-only folders (root)")
    out = tmp_path / "run"
    if where == "empty out":
        out.mkdir()
        locked = out
    else:
        with RunDir(out, "demo", [], {}, force=True) as run:
            run.write_text("sub/b.csv", "1\n")
            run.finish()
        locked = out / "sub"
    if refusal == "kernel":
        locked.chmod(0o000 if where == "unlistable subfolder" else 0o555)
    elif where == "unlistable subfolder":
        unlistable(locked)
    else:
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.fspath(dir) == os.fspath(locked):
                raise PermissionError(13, "Permission denied", os.fspath(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        with pytest.raises(_common.StudyError,
                           match=rf"--out {out}: cannot write in {locked} \(Permission denied\)"
                                 r".*make it writable \(chmod -R u\+w"):
            _common.check_out(out, "demo", force=True)
    finally:
        locked.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made or moved


def test_a_runs_text_is_utf8_whatever_the_locale(tmp_path):
    """RunDir.write_text wrote in the locale's encoding: under a Latin-1 or ASCII locale the
    σ of studies.rounding's clipping table raised UnicodeEncodeError once the work was done
    (a traceback, the run lost), and a Latin-1 character became a byte the paper's UTF-8
    LaTeX does not read. The C locale without UTF-8 mode or coercion is ASCII here."""
    import subprocess

    code = ("import sys\nfrom pathlib import Path\nfrom studies._common import RunDir\n"
            "with RunDir(Path(sys.argv[1]), 'demo', [], {}, force=True) as run:\n"
            "    run.write_text('t.tex', '\\u03c3 \\u00b1 \\u00e9\\n')\n"
            "    run.write_macros('m.tex', {'sigma': '\\u03c3'})\n"
            "    run.finish()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    env.update(LC_ALL="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0",
               PYTHONPATH=os.pathsep.join([str(Path(_common.__file__).parents[1]),
                                           env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert (tmp_path / "run" / "t.tex").read_bytes() == "σ ± é\n".encode()
    assert "{σ}" in (tmp_path / "run" / "m.tex").read_text(encoding="utf-8")


def test_a_replaced_runs_copy_that_cannot_be_removed_is_said_after_the_run_is_published(
        tmp_path, monkeypatch, capsys):
    """A file of the previous run that may not be removed (chattr +i; EPERM) failed the
    removal of its copy after the new run was published: the study exited 1 with a bare
    "[Errno 1] Operation not permitted: 'f1.txt'", no word that the run was complete at
    --out or where the copy was. Root removes any file: the refusal is played by unlink."""
    out = tmp_path / "results"
    with RunDir(out, "demo", [], {}, force=False) as run:
        for i in range(3):
            run.write_text(f"f{i}.txt", "x\n")
        run.finish()
    real = Path.unlink

    def unlink(self, *a, **k):
        if ".old-" in str(self.parent) and self.name == "f1.txt":
            raise PermissionError(1, "Operation not permitted", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert _common.study_main(_replacing(out))([]) == _common.EXIT_REFUSED
    old, = tmp_path.glob(".results.old-*")
    err = capsys.readouterr().err
    assert f"the run is complete at {out}, but the previous one's copy at {old} could not be " \
           f"removed (Operation not permitted: {old / 'f1.txt'}); remove it by hand" in err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "new.txt"]


def test_a_stale_folder_that_cannot_be_removed_is_left_marked_and_the_run_goes_on(
        tmp_path, monkeypatch):
    """A killed run's folder holding a file this process may not remove (chattr +i, EPERM)
    made every check_out aimed at the same --out fail before any work with a bare
    "[Errno 1] Operation not permitted: 'f1.txt'", naming no folder, and rmtree had
    removed its mark first, so it then stayed for good as a user's folder. Root removes any
    file: the refusal is played by os.unlink."""
    out = tmp_path / "results"
    stale = tmp_path / ".results.partial-4194303"
    stale.mkdir()
    _common._mark(stale)
    for name in ("f0.txt", "f1.txt"):
        (stale / name).write_text("x\n")
    real = os.unlink

    def unlink(path, *a, **k):
        if os.path.basename(os.fspath(path)) == "f1.txt":
            raise PermissionError(1, "Operation not permitted", os.fspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(_common, "process_alive", lambda pid: False)
    monkeypatch.setattr(os, "unlink", unlink)
    assert _common.check_out(out, "demo", force=False) == out
    assert (stale / _common.STAGING_MARK).is_file() and (stale / "f1.txt").is_file()
    monkeypatch.setattr(os, "unlink", real)
    assert _common.clean_stale_partials(out) == [stale]  # once it can
    assert not stale.exists()


@pytest.mark.parametrize("manifest, says", [
    ([1], "a JSON array"), ("drift", "a JSON string"), (None, "null"), (3, "a number"),
    ({"outputs": ["a.csv"]}, "outputs that are no object"),
    ({"argv": "--smoke"}, "an argv that is no list of words"),
    ({"argv": ["--seed", 1]}, "an argv that is no list of words"),
    ({"git": "abc"}, "a git that is no object"),
    ({"git": {"commit": 5}}, "a commit that is no text"),
    ({"config": [1]}, "a config that is no object"),
    ({"model": "resnet50"}, "a model that is no object"),
    ({"models": [1]}, "models that are no object"),
    ({"timing_outputs": "t.csv"}, "timing_outputs that are no list"),
    ({"model": {"sha256": 5}}, "a checkpoint sha256 that is no text"),
    ({"models": {"a": {"sha256": ["x"]}}}, "a checkpoint sha256 that is no text"),
])
def test_manifest_shape_names_the_field_no_study_writes(manifest, says):
    """The one check of a manifest's shape that the paper's build and the README's records
    both read (each had its own, and the two differed: the build let an argv of numbers
    through, the records a checkpoint's sha256 of another type)."""
    assert _common.manifest_shape(manifest) == says


def test_manifest_shape_passes_what_studies_write_and_absent_fields():
    assert _common.manifest_shape({}) is None
    assert _common.manifest_shape({"argv": None, "git": None, "config": None}) is None
    written = {"study": "drift", "outputs": {"a.csv": "0" * 64}, "argv": ["--smoke"],
               "git": {"commit": "baae177", "dirty": False}, "config": {"smoke": True},
               "model": {"model": "resnet50", "sha256": "f" * 64},
               "models": {"b": {"model": "resnet18"}}, "timing_outputs": ["timing.csv"]}
    assert _common.manifest_shape(written) is None


def test_git_identity_counts_untracked_code_as_dirty_and_nothing_else(tmp_path, monkeypatch):
    """A run's provenance says "dirty" for a changed tracked file, and for an untracked file
    in the code's folders (a new module the run imported, which the commit does not hold: it
    read clean before); an untracked file elsewhere (a user's notes) leaves it clean."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "qerror").mkdir()
    (tmp_path / "qerror" / "a.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "qerror/a.py")
    git("commit", "-qm", "a")
    monkeypatch.setattr(_common, "REPO", tmp_path)
    clean = _common.git_identity()
    assert clean["dirty"] is False and len(clean["commit"]) == 40
    (tmp_path / "notes.txt").write_text("mine\n")
    assert _common.git_identity()["dirty"] is False
    for folder in _common.CODE_FOLDERS:
        new = tmp_path / folder / "sub" / "new.py"
        new.parent.mkdir(parents=True, exist_ok=True)
        new.write_text("y = 2\n")
        assert _common.git_identity()["dirty"] is True, folder
        new.unlink()
    assert _common.git_identity()["dirty"] is False
    (tmp_path / "qerror" / "a.py").write_text("x = 2\n")
    assert _common.git_identity()["dirty"] is True
