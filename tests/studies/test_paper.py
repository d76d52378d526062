"""paper/build.py without LaTeX: collecting study outputs, the provenance appendix, the log
checker, and the rule against numbers typed by hand into the paper."""

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from studies._common import STAGING_MARK

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("paper_build", REPO / "paper" / "build.py")
build = importlib.util.module_from_spec(_spec)
sys.modules["paper_build"] = build  # dataclasses look their module up there
_spec.loader.exec_module(build)


def fake_run(folder: Path, study: str, files: dict[str, str], argv=None) -> Path:
    """A finished run of ``study``: its files and a manifest that lists their sha256."""
    folder.mkdir(parents=True)
    outputs = {}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        outputs[name] = hashlib.sha256(text.encode()).hexdigest()
    manifest = {"study": study, "argv": argv if argv is not None else ["--smoke"],
                "config": {"seed": 0}, "git": {"commit": "ab" * 20, "dirty": False},
                "outputs": outputs, "timing_outputs": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def uses(**files) -> "build.Uses":
    return build.Uses({s: set(files.get(s, ())) for s in build.STUDIES},
                      {s: set() for s in build.STUDIES})


# --------------------------------------------------------------------------- collecting


def test_missing_study_output_is_named_with_its_command(tmp_path):
    with pytest.raises(build.BuildError) as err:
        build.check_run("drift", tmp_path / "runs" / "drift", uses())
    msg = str(err.value)
    assert str(tmp_path / "runs" / "drift") in msg
    assert f"python -m studies.drift --out {tmp_path / 'runs' / 'drift'} --force" in msg
    # the repository's own runs/drift: make run writes it
    assert "make run" in build.make_command("drift", REPO / "runs" / "drift")
    with pytest.raises(build.BuildError, match=r"python -m studies\.rounding"):
        build.check_run("rounding", tmp_path / "nowhere", uses())


def test_a_missing_run_elsewhere_is_named_with_the_command_that_writes_there(tmp_path):
    """With --runs DIR (or --run STUDY=PATH) the build said 'make it with: make run
    (python -m studies.drift --force)', which writes runs/drift of the repository, not the
    folder the build reads; it names the study with --out set to that folder now, and keeps
    make run for the default folder."""
    folder = tmp_path / "my runs" / "drift"
    with pytest.raises(build.BuildError) as err:
        build.check_run("drift", folder, uses())
    msg = str(err.value)
    assert f"python -m studies.drift --out '{folder}' --force" in msg and "make run" not in msg
    assert build.make_command("drift", REPO / "runs" / "drift") == build.MAKE_COMMAND["drift"]
    assert build.make_command("seeds", None) == build.MAKE_COMMAND["seeds"]


def test_main_exits_non_zero_naming_every_missing_study(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(build, "GENERATED", tmp_path / "generated")
    assert build.main(["--runs", str(tmp_path / "runs"), "--no-compile"]) == 2
    err = capsys.readouterr().err
    for study in build.STUDIES:
        assert f"no output of the {study} study" in err
        assert f"studies.{study}" in err
    assert not (tmp_path / "generated").exists()


def test_run_missing_a_file_the_paper_uses_says_which_and_how(tmp_path):
    run = fake_run(tmp_path / "r", "rounding", {"macros.tex": "% m\n"})
    with pytest.raises(build.BuildError) as err:
        build.check_run("rounding", run, uses(rounding=["clipping_optima.tex"]))
    assert "clipping_optima.tex" in str(err.value)
    assert "python -m studies.rounding --smoke" in str(err.value)


def test_run_missing_a_macro_the_paper_quotes(tmp_path):
    run = fake_run(tmp_path / "r", "drift",
                   {"macros.tex": "\\newcommand{\\driftFloatAccuracy}{90.00}\n"})
    want = build.Uses({s: set() for s in build.STUDIES},
                      {**{s: set() for s in build.STUDIES},
                       "drift": {"driftFloatAccuracy", "driftExpDriftFloor"}})
    with pytest.raises(build.BuildError, match=r"\\driftExpDriftFloor"):
        build.check_run("drift", run, want)


@pytest.mark.parametrize("body", ["nan", "NaN", "inf", "\\ensuremath{-}inf", "+inf",
                                  "<NA>", "0.5 [nan, 0.7]"])
def test_a_macro_the_paper_quotes_that_is_not_a_number_is_refused(tmp_path, body):
    """A study that met a NaN or an infinity formats it as text ("nan", "inf", pandas'
    "<NA>"); LaTeX would print it as a result: the build names the macro, what it holds
    and the run's command before LaTeX runs."""
    run = fake_run(tmp_path / "r", "drift",
                   {"macros.tex": "\\newcommand{\\driftFloatAccuracy}{90.00}\n"
                                  f"\\newcommand{{\\driftExpDriftFloor}}{{{body}}}\n"
                                  "\\newcommand{\\driftUnused}{nan}\n"})
    want = build.Uses({s: set() for s in build.STUDIES},
                      {**{s: set() for s in build.STUDIES},
                       "drift": {"driftFloatAccuracy", "driftExpDriftFloor"}})
    with pytest.raises(build.BuildError) as err:
        build.check_run("drift", run, want)
    msg = str(err.value)
    assert "\\driftExpDriftFloor" in msg and body in msg and "not a number" in msg
    assert "\\driftFloatAccuracy" not in msg and "driftUnused" not in msg
    assert "python -m studies.drift --smoke" in msg
    # words that hold the letters are no figure: text macros pass
    ok = fake_run(tmp_path / "ok", "drift",
                  {"macros.tex": "\\newcommand{\\driftFloatAccuracy}{informed, \\infty}\n"
                                 "\\newcommand{\\driftExpDriftFloor}{Infinite nano}\n"})
    build.check_run("drift", ok, want)


def test_altered_output_or_other_study_is_refused(tmp_path):
    run = fake_run(tmp_path / "r", "dataset", {"macros.tex": "% m\n"})
    (run / "macros.tex").write_text("% edited\n")
    with pytest.raises(build.BuildError, match="sha256 differs"):
        build.check_run("dataset", run, uses())
    other = fake_run(tmp_path / "o", "rounding", {"macros.tex": "% m\n"})
    with pytest.raises(build.BuildError, match="not a run of the dataset study"):
        build.check_run("dataset", other, uses())


@pytest.mark.parametrize("text", ["[1, 2]", "\"drift\"", "null", "3",
                                  '{"study": "drift", "outputs": {}, "argv": "--smoke"}'])
def test_a_manifest_of_another_shape_is_refused_as_no_run(tmp_path, text):
    """Valid JSON that is not a study's manifest (a list, a string, null, a number) stopped
    the build with an AttributeError, and an argv that is no list was quoted letter by letter
    as the run's command; both are refused as no study's manifest, naming the folder and the
    command that makes one."""
    run = fake_run(tmp_path / "r", "drift", {"macros.tex": "% m\n"})
    (run / "manifest.json").write_text(text)
    with pytest.raises(build.BuildError) as err:
        build.check_run("drift", run, uses())
    assert str(run) in str(err.value) and "python -m studies.drift" in str(err.value)


@pytest.mark.parametrize("field, value, says", [
    ("git", "abc", "a git that is no object"), ("git", {"commit": 5}, "a commit that is no text"),
    ("config", [1], "a config that is no object"), ("models", [1], "models that are no object"),
    ("model", {"model": "resnet50", "sha256": 5}, "a checkpoint sha256 that is no text"),
    ("timing_outputs", "t.csv", "timing_outputs that are no list"),
])
def test_a_manifest_whose_fields_have_another_shape_is_refused(tmp_path, monkeypatch, field,
                                                               value, says):
    """A run's manifest whose git, config, models or checkpoint sha256 no study writes so
    passed the checks and stopped the build with an AttributeError or TypeError while it
    wrote the settings or the provenance (a timing_outputs string was listed letter by
    letter): refused as no study's manifest, naming the folder and the field."""
    fake_ledger(monkeypatch)
    runs = all_runs(tmp_path / "runs")
    path = runs["drift"] / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(build.BuildError) as err:
        build.write_generated(runs, uses(), tmp_path / "generated", smoke=True)
    assert f"{runs['drift']}/manifest.json is not a study's manifest (it holds {says})" \
        in str(err.value)


def test_a_manifest_with_a_null_argv_is_still_a_run(tmp_path):
    run = fake_run(tmp_path / "r", "drift", {"macros.tex": "% m\n"})
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "argv": None}))
    assert build.check_run("drift", run, uses())["argv"] is None


def test_an_output_named_outside_its_run_is_refused(tmp_path, monkeypatch):
    """A foreign or corrupt manifest listing "../../main.tex" as an output (its sha256 right)
    had the build copy that file to generated/<study>/../../main.tex: over paper/main.tex."""
    fake_ledger(monkeypatch)
    runs = all_runs(tmp_path / "runs")
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "main.tex").write_text("the paper\n")
    shutil.rmtree(runs["rounding"])
    runs["rounding"] = fake_run(tmp_path / "runs" / "rounding", "rounding",
                                {"macros.tex": "%\n", "../../main.tex": "a run's file\n"})
    with pytest.raises(build.BuildError, match=r"'\.\./\.\./main\.tex'.*not a file inside"):
        build.write_generated(runs, uses(), paper / "generated", smoke=True)
    assert (paper / "main.tex").read_text() == "the paper\n"
    assert sorted(p.name for p in paper.iterdir()) == ["main.tex"]


def fake_ledger(monkeypatch, fail: bool = False):
    """build.write_ledger without the ledger's own run (seconds): a claims table, or the
    error a failed ledger gives."""
    def write(generated, python=sys.executable):
        if fail:
            raise build.BuildError("python -m studies.ledger --latex failed: (a test)")
        (generated / "claims.tex").write_text("% claims\n")
        return "python -m studies.ledger --latex"
    monkeypatch.setattr(build, "write_ledger", write)


def all_runs(folder: Path, argv=None) -> dict[str, Path]:
    return {s: fake_run(folder / s, s, {"macros.tex": f"% {s}\n", "sub/t.tex": "x"}, argv)
            for s in build.STUDIES}


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_write_generated_copies_every_output_the_manifest_ledger_and_provenance(
        tmp_path, monkeypatch):
    fake_ledger(monkeypatch)
    runs = all_runs(tmp_path / "runs")
    gen = tmp_path / "paper" / "generated"
    (gen / "stale").mkdir(parents=True)
    manifests = build.write_generated(runs, uses(), gen, smoke=True)
    assert set(manifests) == set(build.STUDIES)
    assert not (gen / "stale").exists()
    for s in build.STUDIES:
        assert (gen / s / "macros.tex").read_text() == f"% {s}\n"
        assert (gen / s / "sub" / "t.tex").read_text() == "x"
        assert (gen / s / "manifest.json").exists()
    assert (gen / "claims.tex").exists() and (gen / "provenance.tex").exists()
    assert not (gen / STAGING_MARK).exists()
    assert sorted(p.name for p in gen.parent.iterdir()) == ["generated"]  # nothing left


def test_the_full_paper_refuses_a_smoke_run(tmp_path):
    runs = {"drift": fake_run(tmp_path / "drift", "drift", {"macros.tex": "%\n"})}
    with pytest.raises(build.BuildError, match="a --smoke run of the drift study"):
        build.check_runs(runs, uses())
    full = {"drift": fake_run(tmp_path / "full", "drift", {"macros.tex": "%\n"}, argv=[])}
    assert set(build.check_runs(full, uses())) == {"drift"}


@pytest.mark.parametrize("failure", ["ledger", "interrupt", "bad run"])
def test_a_failed_or_interrupted_build_leaves_the_previous_generated_parts(
        tmp_path, monkeypatch, failure):
    # the generated tree was rebuilt in place: a failing ledger left it without claims.tex
    # and provenance.tex, a Ctrl-C while copying left half the studies
    fake_ledger(monkeypatch)
    gen = tmp_path / "paper" / "generated"
    build.write_generated(all_runs(tmp_path / "old"), uses(), gen, smoke=True)
    before = tree(gen)
    runs = all_runs(tmp_path / "new", argv=["--smoke", "--seed", "1"])
    if failure == "ledger":
        fake_ledger(monkeypatch, fail=True)
    elif failure == "interrupt":
        real, copied = shutil.copyfile, []

        def copy_then_interrupt(src, dst, *args, **kwargs):
            copied.append(src)
            if len(copied) == 5:  # Ctrl-C part-way through the copies
                raise KeyboardInterrupt
            return real(src, dst, *args, **kwargs)
        monkeypatch.setattr(shutil, "copyfile", copy_then_interrupt)
    else:
        (runs["seeds"] / "macros.tex").write_text("% edited\n")
    with pytest.raises((build.BuildError, KeyboardInterrupt)):
        build.write_generated(runs, uses(), gen, smoke=True)
    assert tree(gen) == before
    assert sorted(p.name for p in gen.parent.iterdir()) == ["generated"]  # no staging left


def test_a_killed_builds_staging_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    fake_ledger(monkeypatch)
    gen = tmp_path / "paper" / "generated"
    gen.parent.mkdir()
    dead = 2 ** 22 + 1  # above Linux's largest process id: no process has it
    left = gen.parent / f".generated.partial-{dead}"
    (left / "drift").mkdir(parents=True)
    (left / STAGING_MARK).write_text("made by a qerror study\n")
    build.write_generated(all_runs(tmp_path / "runs"), uses(), gen, smoke=True)
    assert sorted(p.name for p in gen.parent.iterdir()) == ["generated"]


@pytest.mark.parametrize("how", ["--runs", "--run"])
def test_runs_inside_the_generated_folder_are_refused(tmp_path, monkeypatch, capsys, how):
    # --runs paper/generated: the build deleted its own sources and crashed
    fake_ledger(monkeypatch)
    gen = tmp_path / "paper" / "generated"
    build.write_generated(all_runs(tmp_path / "runs"), uses(), gen, smoke=True)
    before = tree(gen)
    monkeypatch.setattr(build, "GENERATED", gen)
    monkeypatch.setattr(build, "paper_uses", lambda sources, studies=build.STUDIES: uses())
    monkeypatch.setattr(build, "is_smoke_run", lambda manifest: False)
    argv = ["--runs", str(gen)] if how == "--runs" else \
        ["--runs", str(tmp_path / "runs"), "--run", f"drift={gen / 'drift'}"]
    assert build.main([*argv, "--no-compile"]) == 2
    err = capsys.readouterr().err
    assert f"is inside {gen}" in err and "the drift run" in err
    assert tree(gen) == before


def test_main_writes_where_generated_points(tmp_path, monkeypatch):
    # collect's default folder was bound when the module loaded: a test that pointed
    # GENERATED elsewhere still had the real paper/generated written
    fake_ledger(monkeypatch)
    gen = tmp_path / "generated"
    real = build.PAPER / "generated"
    real_before = tree(real) if real.exists() else None
    monkeypatch.setattr(build, "GENERATED", gen)
    monkeypatch.setattr(build, "paper_uses", lambda sources, studies=build.STUDIES: uses())
    all_runs(tmp_path / "runs", argv=[])
    assert build.main(["--runs", str(tmp_path / "runs"), "--no-compile"]) == 0
    assert set(build.STUDIES) <= {p.name for p in gen.iterdir()}
    assert (tree(real) if real.exists() else None) == real_before


def test_no_compile_removes_the_pdf_of_the_parts_it_replaced(tmp_path, monkeypatch, capsys):
    """--no-compile replaced the generated parts and left an earlier build's main.pdf beside
    them, read as the paper of these runs; it is removed, and the build says so."""
    fake_ledger(monkeypatch)
    monkeypatch.setattr(build, "GENERATED", tmp_path / "generated")
    monkeypatch.setattr(build, "paper_uses", lambda sources, studies=build.STUDIES: uses())
    all_runs(tmp_path / "runs", argv=[])
    (tmp_path / "main.pdf").write_bytes(b"%PDF-1.5 of the earlier parts\n")
    assert build.main(["--runs", str(tmp_path / "runs"), "--no-compile"]) == 0
    assert not (tmp_path / "main.pdf").exists()
    assert f"{tmp_path / 'main.pdf'}, of the parts they replaced, was removed" \
        in capsys.readouterr().out
    # a build that fails before it replaces them leaves the PDF of the parts still there
    (tmp_path / "main.pdf").write_bytes(b"%PDF-1.5 of the parts still there\n")
    assert build.main(["--runs", str(tmp_path / "nothing"), "--no-compile"]) == 2
    assert (tmp_path / "main.pdf").exists()


def with_model(run: Path, model: dict | None = None, models: dict | None = None) -> Path:
    """``run`` with the model identity a study records in its manifest."""
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update({k: v for k, v in (("model", model), ("models", models)) if v})
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def baseline(digest: str) -> dict:
    return {"model": "fashion-resnet50", "sha256": digest,
            "checkpoint": "/cache/fashion-resnet50-imagenet.pt", "metrics": {}}


def test_runs_of_different_baseline_checkpoints_are_refused(tmp_path):
    # runs made on two baselines (a retrained cache) were mixed into one paper silently
    a, b = "21a73d40" + "0" * 56, "e304f348" + "1" * 56
    runs = {
        "drift": with_model(fake_run(tmp_path / "drift", "drift", {}), baseline(a)),
        "dataset": with_model(fake_run(tmp_path / "dataset", "dataset", {}), baseline(b)),
        "rounding_choice": with_model(fake_run(tmp_path / "rc", "rounding_choice", {}),
                                      models={"resnet50": baseline(a),
                                              "small": {"model": "fashion-small-cnn"}}),
        "rounding": fake_run(tmp_path / "rounding", "rounding", {}),
    }
    with pytest.raises(build.BuildError, match=r"different checkpoints of one network "
                                               r"\(fashion-resnet50: 2 files\)") as err:
        build.check_runs(runs, uses(), smoke=True)
    msg = str(err.value)
    for study, digest in (("drift", a), ("dataset", b), ("rounding_choice", a)):
        assert f"{study} ({runs[study]}): fashion-resnet50 sha256 {digest[:12]}" in msg
    assert "rounding (" not in msg  # a run of no checkpoint is not in the mix
    with_model(runs["dataset"], baseline(a))
    assert set(build.check_runs(runs, uses(), smoke=True)) == set(runs)
    # two networks in one run (rounding_choice --models resnet18 resnet50 small) are no mix
    r18 = {"model": "fashion-resnet18", "sha256": "8d9ed2" + "2" * 58, "checkpoint": "r18.pt"}
    with_model(runs["rounding_choice"], models={"resnet18": r18, "resnet50": baseline(a),
                                                "small": {"model": "fashion-small-cnn"}})
    assert set(build.check_runs(runs, uses(), smoke=True)) == set(runs)


def test_provenance_names_each_runs_checkpoint(tmp_path):
    digest = "21a73d40" + "0" * 56
    drift = with_model(fake_run(tmp_path / "d", "drift", {}), baseline(digest))
    smoke = with_model(fake_run(tmp_path / "e", "early_exit", {}),
                       {"model": "fashion-resnet18-untrained-smoke", "seed": 0})
    manifests = {s: json.loads((r / "manifest.json").read_text())
                 for s, r in (("drift", drift), ("early_exit", smoke))}
    tex = build.provenance_tex(manifests, "python -m studies.ledger --latex", "c" * 40)
    drift_part = tex[tex.index("Study \\texttt{drift}"):tex.index("Study \\texttt{early")]
    assert r"\item[Model] fashion-resnet50, checkpoint \texttt{" + digest + "}" in drift_part
    assert "/\\allowbreak{}fashion-{}resnet50-{}imagenet.pt" in drift_part  # its file
    assert r"\item[Model] fashion-resnet18-untrained-smoke (no checkpoint file)" in tex


def test_provenance_says_when_the_checkout_moved_during_a_run(tmp_path):
    run = fake_run(tmp_path / "d", "drift", {"macros.tex": "m"}, argv=[])
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["git"]["at_finish"] = {"commit": "cd" * 20, "dirty": False}
    tex = build.provenance_tex({"drift": manifest}, "python -m studies.ledger --latex", "c" * 40)
    assert "cd" * 20 in tex and "the checkout changed while it ran" in tex


def test_paper_uses_reads_figures_tables_and_macros(tmp_path):
    tex = tmp_path / "a.tex"
    tex.write_text("\\studyfigure[0.5\\linewidth]{drift}{depth_8bit_both}\n"
                   "\\studytable{rounding}{clipping_optima.tex} \\driftFloatAccuracy{}\n"
                   "% \\studytable{dataset}{commented.tex}\n")
    u = build.paper_uses([tex])
    assert u.files["drift"] == {"depth_8bit_both.pdf"}
    assert u.files["rounding"] == {"clipping_optima.tex"}
    assert u.files["dataset"] == set()
    assert u.macros["drift"] == {"driftFloatAccuracy"}


def test_the_settings_the_prose_states_come_from_the_runs_config(tmp_path):
    """main.tex typed a power ('a power of four in five'), a level ('at the five per cent
    level') and how many images a tail share counts ('the five most extreme') in words: a
    run with another power, level or count left the prose stating the old one. Each is now
    a \\setting macro written from the config of the run the paper reads."""
    tex = tmp_path / "a.tex"
    tex.write_text("with a power of \\settingDriftResolvePower{}, the \\settingDriftTailTop{} "
                   "most extreme among the \\settingDriftTailTopTwice{}, at $\\alpha = "
                   "\\settingEarlyExitSelectAlpha$\n% \\settingNotUsed in a comment\n")
    u = build.paper_uses([tex])
    assert u.settings == {"settingDriftResolvePower", "settingDriftTailTop",
                          "settingDriftTailTopTwice", "settingEarlyExitSelectAlpha"}
    manifests = {"drift": {"config": {"resolve_power": 0.9, "tail_top": 12}},
                 "early_exit": {"config": {"select_alpha": 0.01}}}
    text = build.settings_tex(manifests, {}, u.settings)
    assert "\\newcommand{\\settingDriftResolvePower}{0.9}" in text
    assert "\\newcommand{\\settingDriftTailTop}{twelve}" in text
    assert "\\newcommand{\\settingDriftTailTopTwice}{24}" in text
    assert "\\newcommand{\\settingEarlyExitSelectAlpha}{0.01}" in text
    # only what the sources use is written
    assert build.settings_tex(manifests, {}, frozenset()).count("newcommand") == 0
    # the paper's own prose states them so, and reads the file they are in
    main = (build.PAPER / "main.tex").read_text(encoding="utf-8")
    assert "\\input{generated/settings.tex}" in main
    assert build.paper_uses(build.paper_sources()).settings == set(build.SETTINGS)
    for words in ("four in five", "five per cent", "five most extreme", "the ten with"):
        assert words not in main


@pytest.mark.parametrize("config, says", [
    ({}, "does not record it"),
    ({"resolve_power": 1.0, "tail_top": 5}, "records 1.0, not a power in (0, 1)"),
    ({"resolve_power": 0.8, "tail_top": True}, "records True, not a count of images above 0"),
    ({"resolve_power": 0.8, "tail_top": 0}, "records 0, not a count"),
])
def test_a_run_without_a_setting_the_prose_states_is_named_with_its_rerun(tmp_path, config,
                                                                          says):
    runs = {"drift": tmp_path / "runs" / "drift"}
    with pytest.raises(build.BuildError) as err:
        build.settings_tex({"drift": {"config": config}}, runs,
                           frozenset({"settingDriftResolvePower", "settingDriftTailTop"}))
    msg = str(err.value)
    assert says in msg and str(runs["drift"]) in msg
    assert f"rerun it: python -m studies.drift --out {runs['drift']} --force" in msg


def test_an_early_exit_run_that_chose_by_estimate_is_refused():
    with pytest.raises(build.BuildError, match=r"records None, not a level in \(0, 0\.5\) "
                       r"\(None: .*--select estimate"):
        build.settings_tex({"early_exit": {"config": {"select_alpha": None}}}, {},
                           frozenset({"settingEarlyExitSelectAlpha"}))


def _macros_run(folder, study, macros, argv):
    return fake_run(folder, study, {"macros.tex": "".join(
        f"\\newcommand{{\\{k}}}{{{v}}}\n" for k, v in macros.items())}, argv=argv)


_ECE = ("earlyExitEceBeforeMaxInt", "earlyExitEceAfterMaxIntNll", "earlyExitEceAfterMaxInt",
        "earlyExitEceAfterMaxIntIsotonic")


@pytest.mark.parametrize("study, macros, names", [
    ("dataset", {"datasetEquivDifferingLogits": "3"}, ["same computation"]),
    ("dataset", {"datasetEquivDifferingLogits": "1{,}204"}, ["same computation"]),
    ("early_exit", {"earlyExitEceBeforeMaxInt": "5.10", "earlyExitEceAfterMaxIntNll": "2.43",
                    "earlyExitEceAfterMaxIntIsotonic": "1.47"}, ["'can bend'", "undefined"]),
    ("early_exit", dict(zip(_ECE, ("2.10", "2.43", "2.43", "1.47"))), ["'falls'"]),
    ("early_exit", dict(zip(_ECE, ("2.43", "2.43", "2.43", "1.47"))), ["'falls'"]),
    ("early_exit", dict(zip(_ECE, ("5.10", "2.43", "2.43", "2.60"))), ["'can bend'"]),
    ("early_exit", dict(zip(_ECE, ("2.10", "2.43", "2.43", "2.60"))), ["'falls'",
                                                                       "'can bend'"]),
    # the ECE-minimising temperature's figure is the sentence's second "to"
    ("early_exit", {**dict(zip(_ECE, ("5.10", "2.43", "2.43", "1.47"))),
                    "earlyExitEceAfterMaxIntEce": "5.36"},
     ["'minimising the validation ECE itself, to ...'"]),
    ("early_exit", {**dict(zip(_ECE, ("5.10", "2.43", "2.43", "1.47"))),
                    "earlyExitEceAfterMaxIntEce": "5.10"},
     ["'minimising the validation ECE itself, to ...'"]),
    ("early_exit", {"earlyExitLastTestFrozen": "88.81", "earlyExitLastTestJoint": "88.81"},
     ["'raises the last exit too'"]),
    ("early_exit", {"earlyExitLastTestFrozen": "88.81", "earlyExitLastTestJoint": "--"},
     ["'raises the last exit too'", "= --"]),
])
def test_figures_that_contradict_the_proses_words_stop_the_full_build(tmp_path, study, macros,
                                                                      names):
    """main.tex says in words what only some figures bear out (the two deployments are "the
    same computation", the ECE "falls", the isotonic map "can bend" what the temperature
    cannot): a full run whose figures say otherwise is refused, naming the sentence and the
    figures, before LaTeX prints them beside it; the smoke paper, whose figures are no
    results, is built."""
    quoted = build.Uses({s: set() for s in build.STUDIES},
                        {**{s: set() for s in build.STUDIES}, study: set(macros)})
    run = _macros_run(tmp_path / study, study, macros, argv=[])
    with pytest.raises(build.BuildError) as err:
        build.check_runs({study: run}, quoted)
    msg = str(err.value)
    assert all(name in msg for name in names), msg
    assert str(run) in msg and f"python -m studies.{study}" in msg
    smoke = _macros_run(tmp_path / "smoke", study, macros, argv=["--smoke"])
    assert set(build.check_runs({study: smoke}, quoted, smoke=True)) == {study}
    # a paper that no longer quotes the sentence's figures no longer judges it
    assert set(build.check_runs({study: run}, uses())) == {study}


def test_figures_that_bear_out_the_proses_words_pass():
    ok = {"datasetEquivDifferingLogits": "0",
          **dict(zip(_ECE, ("5.10", "2.43", "2.43", "1.47"))),
          "earlyExitEceAfterMaxIntEce": "2.61",
          "earlyExitLastTestFrozen": "88.81", "earlyExitLastTestJoint": "90.17"}
    for d in build.DIRECTIONS:
        assert d.holds(*(build._macro_number(ok[n]) for n in d.macros))
    assert build._macro_number("\\ensuremath{-}1{,}234.5") == -1234.5


def test_each_direction_checked_is_a_sentence_of_the_paper():
    """Each entry of DIRECTIONS quotes a macro main.tex quotes, so that removing or
    rewording the sentence leaves no stale check behind unnoticed."""
    quoted = build.paper_uses(build.paper_sources()).macros
    for d in build.DIRECTIONS:
        assert set(d.macros) & quoted[d.study], d.says


def test_an_unknown_setting_macro_is_refused(tmp_path):
    tex = tmp_path / "a.tex"
    tex.write_text("at \\settingDriftAlpha{}\n")
    with pytest.raises(build.BuildError, match=r"a\.tex: \\settingDriftAlpha is not a "
                       r"setting build\.py writes"):
        build.paper_uses([tex])


def test_write_generated_writes_the_settings_the_paper_uses(tmp_path, monkeypatch):
    fake_ledger(monkeypatch)
    runs = all_runs(tmp_path / "runs")
    manifest = json.loads((runs["drift"] / "manifest.json").read_text())
    manifest["config"]["resolve_power"] = 0.8
    (runs["drift"] / "manifest.json").write_text(json.dumps(manifest))
    want = build.Uses(uses().files, uses().macros, frozenset({"settingDriftResolvePower"}))
    gen = tmp_path / "generated"
    build.write_generated(runs, want, gen, smoke=True)
    assert "\\newcommand{\\settingDriftResolvePower}{0.8}" in (gen / "settings.tex").read_text()
    # a run without it: refused before anything is written, the previous parts kept
    manifest["config"].pop("resolve_power")
    (runs["drift"] / "manifest.json").write_text(json.dumps(manifest))
    before = tree(gen)
    with pytest.raises(build.BuildError, match="config.resolve_power of the drift run"):
        build.write_generated(runs, want, gen, smoke=True)
    assert tree(gen) == before


def test_the_paper_uses_only_outputs_of_known_studies():
    u = build.paper_uses(build.paper_sources())
    assert all(u.files[s] for s in build.STUDIES)  # every study has its place in the paper


def test_a_smoke_build_says_so_on_every_page(tmp_path, monkeypatch):
    """The smoke paper looked like the paper: no page before the early-exit section's own
    note said its numbers came from --smoke runs."""
    fake_ledger(monkeypatch)
    gen = tmp_path / "generated"
    build.write_generated(all_runs(tmp_path / "smoke"), uses(), gen, smoke=True)
    assert "\\smokebuildtrue" in (gen / "build.tex").read_text()
    build.write_generated(all_runs(tmp_path / "full", argv=[]), uses(), gen)
    assert "\\smokebuildtrue" not in (gen / "build.tex").read_text()
    main = (build.PAPER / "main.tex").read_text(encoding="utf-8")
    assert "\\input{generated/build.tex}" in main
    preamble, body = main.split("\\begin{document}")
    # the running header of every page (the title page's plain style too) and a box under
    # the title
    assert "\\ifsmokebuild" in preamble and "\\fancypagestyle{plain}" in preamble
    assert body.lstrip().startswith("\n\\maketitle\n\\ifsmokebuild".lstrip())
    assert "\\smokenote" in body.split("\\begin{abstract}")[0]


# --------------------------------------------------------------------------- README records


def test_the_readme_records_verdict_is_read_from_the_records():
    """main.tex stated by hand what the README's early-exit records show ('non-inferior ...
    on every one; where it fails it fails on its upper side')."""
    readme = build._readme()
    verdict = readme.early_exit_verdict(readme.record_reader())
    tex, records = build.readme_tex()
    assert records == verdict.records and len(records) == verdict.baselines
    assert "\\newcommand{\\readmeEarlyExitVerdict}{" \
        + build.early_exit_records_sentence(verdict) + "}" in tex
    main = (build.PAPER / "main.tex").read_text(encoding="utf-8")
    assert "\\readmeEarlyExitVerdict" in main and "\\input{generated/readme.tex}" in main
    assert "non-inferior to FP32 full at the half-point margin on\nevery one" not in main


@pytest.mark.parametrize("non_inferior, equivalent, upper, says", [
    (5, 5, True, "on every one, and the equivalence test passes on every one"),
    (5, 2, True, "on every one, and where the equivalence test fails (three of them) it "
                 "fails on its upper side"),
    (4, 2, False, "margin on four of them, and the equivalence test fails on three of them"),
])
def test_the_readme_records_sentence_follows_the_verdict(non_inferior, equivalent, upper, says):
    verdict = build._readme().EarlyExitVerdict(
        baselines=5, margin=0.005, non_inferior=non_inferior, equivalent=equivalent,
        fails_upper_only=upper, lowest=-0.01, records=(("early_exit", "abcdef1"),))
    sentence = build.early_exit_records_sentence(verdict)
    assert sentence.startswith("the INT8 early exit is non-inferior to FP32 full at the "
                               "0.5-point margin")
    assert says in sentence


def test_a_broken_readme_record_stops_the_build(tmp_path):
    with pytest.raises(build.BuildError, match="the README's records: record early_exit"):
        build.readme_tex(tmp_path)


@pytest.mark.parametrize("record, column", [("early_exit", "tost_ci_lo"),
                                            ("early-exit-seed1", "tost_p")])
def test_a_readme_record_without_its_tost_figure_stops_the_build(tmp_path, record, column):
    """A NaN compares as False: counted as a failed test, it made the paper say "non-inferior
    ... on four of them" from a record the README's own passage refuses to state."""
    readme = build._readme()
    root = tmp_path / "record"
    shutil.copytree(readme.RECORDS, root)
    path = root / record / "operating_points.csv"
    policy = json.loads((root / record / "summary.json").read_text())["head_policy"]
    lines = path.read_text().splitlines()
    names = lines[0].split(",")
    for i, line in enumerate(lines[1:], 1):
        cells = line.split(",")
        if cells[names.index("system")] == "int8_early_exit" \
                and cells[names.index("policy")] == policy:
            cells[names.index(column)] = ""
            lines[i] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    manifest = json.loads((root / record / "manifest.json").read_text())
    manifest["outputs"]["operating_points.csv"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / record / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(build.BuildError, match=f"the README's records: record {record}: "
                       f"operating_points.csv holds nan as its headline rule's {column}"):
        build.readme_tex(root)


# --------------------------------------------------------------------------- provenance


def test_provenance_lists_command_commit_and_every_sha256(tmp_path):
    run = fake_run(tmp_path / "d", "drift", {"macros.tex": "m", "growth_rms_rel.pdf": "p"},
                   argv=["--smoke", "--out", "/tmp/x_y"])
    manifest = json.loads((run / "manifest.json").read_text())
    tex = build.provenance_tex({"drift": manifest}, "python -m studies.ledger --latex",
                               "c" * 40)
    assert r"\section{Provenance" in tex and r"\label{app:provenance}" in tex
    assert "python -{}m studies.drift -{}-{}smoke -{}-{}out" in tex  # "--" stays two hyphens
    assert r"x\_\allowbreak{}y" in tex  # escaped for LaTeX
    assert "ab" * 20 in tex and "c" * 40 in tex
    # the ledger comes from the working tree: a dirty one is said, as a run's is
    claims = tex[tex.index("Claims ledger"):].split("\n")[0]
    assert "uncommitted" not in claims
    dirty = build.provenance_tex({"drift": manifest}, "python -m studies.ledger --latex",
                                 "c" * 40, dirty=True)
    assert "with uncommitted changes" in dirty[dirty.index("Claims ledger"):].split("\n")[0]
    for digest in manifest["outputs"].values():  # in two halves, one line each
        assert r"\texttt{" + digest[:32] + r"} \\" + "\n" + r" & \texttt{" + digest[32:] + "}" \
            in tex
    assert r"growth\_\allowbreak{}rms" in tex
    assert "README records" not in tex
    tex = build.provenance_tex({"drift": manifest}, "python -m studies.ledger --latex",
                               "c" * 40, records=(("early_exit", "765cd35"),))
    assert r"\paragraph{README records.}" in tex
    assert r"record/\allowbreak{}early\_\allowbreak{}exit} (commit \texttt{765cd35})" in tex


@pytest.mark.skipif(not (shutil.which("pdflatex") and shutil.which("pdftotext")),
                    reason="needs pdflatex and pdftotext")
def test_provenance_commands_print_straight_quotes(tmp_path):
    """A command's quoted argument printed with curly quotes in T1 typewriter ('~/x y' as
    ’~/x y’): copied from the PDF, it is not the command that ran."""
    manifest = {"study": "drift", "argv": ["--data-root", "~/x y"], "config": {"seed": 0},
                "git": {"commit": "ab" * 20}, "outputs": {}}
    tex = build.provenance_tex({"drift": manifest}, "python -m studies.ledger --latex", None)
    main = (build.PAPER / "main.tex").read_text(encoding="utf-8")
    preamble = main[:main.index("% The studies' numbers")]  # the packages, before any input
    (tmp_path / "p.tex").write_text(preamble + "\\begin{document}\n" + tex
                                    + "\\end{document}\n", encoding="utf-8")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "p.tex"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    text = subprocess.run(["pdftotext", str(tmp_path / "p.pdf"), "-"], capture_output=True,
                          text=True).stdout
    assert "--data-root '~/x y'" in text and "\u2019" not in text


def test_study_command_quotes_arguments():
    assert build.study_command({"study": "drift", "argv": ["--data", "my dir"]}) == \
        "python -m studies.drift --data 'my dir'"


# --------------------------------------------------------------------------- the LaTeX log


SAMPLE_LOG = r"""This is pdfTeX, Version 3.141592653-2.6-1.40.24 (TeX Live 2022/Debian)
LaTeX Warning: Reference `fig:drift' on page 3 undefined on input line 120.
LaTeX Warning: Citation `nagel2019' on page 4 undefined on input line 130.
Overfull \hbox (36.8pt too wide) in paragraph at lines 48--49
Overfull \hbox (0.5pt too wide) in paragraph at lines 50--51
LaTeX Warning: There were undefined references.
"""


def test_log_checker_catches_undefined_reference_and_citation():
    report = build.check_log(SAMPLE_LOG)
    assert "undefined reference: fig:drift" in report.problems
    assert "undefined citation: nagel2019" in report.problems
    assert len(report.notes) == 1 and "36.8pt" in report.notes[0]


def test_log_checker_catches_undefined_macro_and_missing_figure():
    log = ("! Undefined control sequence.\nl.42 ... \\driftAccFloorEight\n"
           "! LaTeX Error: File `generated/drift/growth.pdf' not found.\n")
    problems = build.check_log(log).problems
    assert "undefined control sequence: \\driftAccFloorEight" in problems
    assert "missing file: generated/drift/growth.pdf" in problems


def test_clean_log_has_no_problems():
    log = "This is pdfTeX\nOutput written on main.pdf (20 pages, 1 bytes).\n"
    assert build.check_log(log) == build.LogReport([], [])


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="needs pdflatex")
def test_a_long_generated_table_takes_one_table_number(tmp_path):
    """main.tex's \\longstudytable (the claims ledger, the drift geometry) set a longtable,
    which steps the table counter, and then its caption, which steps it again: the smoke
    paper numbered its tables 1, 3, ..., 11, 13, ... with no Table 2 or 12. A float table,
    a long one and a float table, with main.tex's own definitions, are Tables 1, 2 and 3,
    with no hyperref anchor twice."""
    main = (build.PAPER / "main.tex").read_text(encoding="utf-8")
    start = main.index("% A generated table longer than a page")
    defs = main[start:main.index("\\makeatother", start) + len("\\makeatother")]

    def table(label):
        return ("\\begin{table}[t]\\centering\\begin{tabular}{ll}a & b\\\\\\end{tabular}"
                f"\\caption{{{label}}}\\label{{{label}}}\\end{{table}}\n")

    (tmp_path / "long.tex").write_text(table("tab:long"))
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\\usepackage{longtable}\\usepackage[hidelinks]{hyperref}\n"
        "\\newif\\ifshrinktables\n"  # main.tex's, which \\longstudytable turns off
        + defs + "\n\\begin{document}\n" + table("tab:first") + "\\longstudytable{long.tex}\n"
        + table("tab:last") + "\\end{document}\n")
    for _ in range(2):
        subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                       cwd=tmp_path, capture_output=True, check=True)
    aux = (tmp_path / "doc.aux").read_text()
    numbers = {m[1]: m[2] for m in re.finditer(r"\\newlabel\{(tab:\w+)\}\{\{(\d+)\}", aux)}
    assert numbers == {"tab:first": "1", "tab:long": "2", "tab:last": "3"}
    assert "same identifier" not in (tmp_path / "doc.log").read_text(errors="replace")


def test_missing_latexmk_is_a_clear_error_and_leaves_no_main_pdf(tmp_path, monkeypatch):
    # the build has replaced the generated parts by then: the previous build's PDF is not
    # of them
    (tmp_path / "main.pdf").write_bytes(b"%PDF-1.5 the previous build's\n")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.BuildError, match="apt-get install .*latexmk"):
        build.compile_pdf(tmp_path)
    assert not (tmp_path / "main.pdf").exists()


FAILED_PDF = "main.failed.pdf"  # where a failed build's PDF goes


def _fake_latexmk(monkeypatch, log: str, returncode: int = 0, writes_pdf: bool = True):
    """latexmk as found on PATH, replaced by one that writes ``log`` (and a PDF)."""
    def run(argv, cwd, **kwargs):
        if writes_pdf:
            (Path(cwd) / "main.pdf").write_bytes(b"%PDF-1.5 this build's\n")
        (Path(cwd) / "main.log").write_text(log)
        return subprocess.CompletedProcess(argv, returncode, stdout="", stderr="")

    monkeypatch.setattr(build.shutil, "which", lambda name: "/usr/bin/latexmk")
    monkeypatch.setattr(build.subprocess, "run", run)


@pytest.mark.parametrize("log, returncode, writes_pdf", [
    ("LaTeX Warning: Reference `fig:x' on page 3 undefined on input line 9.\n", 0, True),
    ("! LaTeX Error: File `generated/x.tex' not found.\n", 12, False),
])
def test_a_failed_compile_leaves_no_main_pdf(tmp_path, monkeypatch, log, returncode,
                                            writes_pdf):
    # the previous build's PDF is of the generated parts this build replaced: neither it nor
    # a PDF with undefined references may be left where the paper is read
    (tmp_path / "main.pdf").write_bytes(b"%PDF-1.5 the previous build's\n")
    _fake_latexmk(monkeypatch, log, returncode, writes_pdf)
    with pytest.raises(build.BuildError) as err:
        build.compile_pdf(tmp_path)
    assert not (tmp_path / "main.pdf").exists()
    assert (tmp_path / FAILED_PDF).exists() == writes_pdf
    assert (FAILED_PDF in str(err.value)) == writes_pdf


def test_a_passing_compile_writes_main_pdf_and_drops_a_failed_ones(tmp_path, monkeypatch):
    (tmp_path / FAILED_PDF).write_bytes(b"%PDF-1.5 an earlier failure\n")
    _fake_latexmk(monkeypatch, "Output written on main.pdf (1 page, 1 bytes).\n")
    build.compile_pdf(tmp_path)
    assert (tmp_path / "main.pdf").read_bytes() == b"%PDF-1.5 this build's\n"
    assert not (tmp_path / FAILED_PDF).exists()


def test_an_interrupted_build_says_so_and_leaves_no_main_pdf(tmp_path, monkeypatch, capsys):
    def interrupted(argv, cwd, **kwargs):
        (Path(cwd) / "main.pdf").write_bytes(b"%PDF-1.5 cut short")
        raise KeyboardInterrupt

    compile_pdf = build.compile_pdf
    monkeypatch.setattr(build, "compile_pdf", lambda: compile_pdf(tmp_path))
    monkeypatch.setattr(build, "write_generated", lambda *a, **k: {})
    monkeypatch.setattr(build.shutil, "which", lambda name: "/usr/bin/latexmk")
    monkeypatch.setattr(build.subprocess, "run", interrupted)
    assert build.main([]) == 130
    assert "interrupted: no " in capsys.readouterr().err
    assert not (tmp_path / "main.pdf").exists() and (tmp_path / FAILED_PDF).exists()


@pytest.mark.parametrize("where", ["study", "latex"])
def test_a_build_ended_by_sigterm_cleans_up_as_ctrl_c_does(tmp_path, where):
    """SIGTERM (timeout, a batch system) ended the build at once: during a smoke study it
    left the temporary folder and the study running, during LaTeX a main.pdf cut short
    where the paper is read. It is taken as Ctrl-C: exit 130, the temporary folder
    removed, no main.pdf."""
    import signal

    script = f"""
import importlib.util, os, signal, subprocess, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("paper_build", {str(REPO / "paper" / "build.py")!r})
build = importlib.util.module_from_spec(spec)
sys.modules["paper_build"] = build
spec.loader.exec_module(build)
paper = Path({str(tmp_path)!r})
build.PAPER, build.GENERATED = paper, paper / "generated"
build.paper_sources = lambda: []

def terminated(*args, **kwargs):  # SIGTERM while a study or LaTeX writes its output
    (paper / "made").write_text(str(args[0]))
    Path(args[0]).mkdir(parents=True, exist_ok=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)

def latexmk(argv, cwd, **kwargs):
    assert Path(cwd) == paper, cwd
    (paper / "main.pdf").write_bytes(b"%PDF-1.5 cut short")
    terminated(paper / "latex")

build.write_generated = lambda *a, **k: {{}}
if {where!r} == "study":
    build.run_smoke = terminated
else:
    compile_pdf = build.compile_pdf
    build.compile_pdf = lambda: compile_pdf(paper)
    build.shutil.which = lambda name: "/usr/bin/latexmk"
    build.subprocess.run = latexmk
# Ctrl-C's action as a terminal gives it (a test run launched as a background job
# inherits it ignored, and Python then leaves it so)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(build.main(["--smoke"] if {where!r} == "study" else []))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert run.returncode == 130, (run.returncode, run.stderr)
    assert "interrupted: no " in run.stderr
    assert not (tmp_path / "main.pdf").exists()
    if where == "study":
        assert not Path((tmp_path / "made").read_text()).exists()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    else:
        assert (tmp_path / FAILED_PDF).exists()


# --------------------------------------------------------------------------- hand-typed numbers


def numbers(body: str, preamble: str = "") -> list[str]:
    src = "\\documentclass{article}\n" + preamble + "\\begin{document}\n" + body + \
        "\n\\end{document}\n"
    return [h.number for h in build.hand_typed_numbers(src)]


@pytest.mark.parametrize("body, found", [
    ("The accuracy is 91.3\\,\\% with truncation.", ["91.3"]),
    ("An 8-bit model.", ["8"]),
    ("on 10,000 images", ["10,000"]),
    ("with 10k images, the 3rd run", ["10", "3"]),
    ("exact MSE is $0.0833$ and \\(1{,}000\\) and $.5$", ["0.0833", "1{,}000", ".5"]),
    ("\\[ \\mathrm{MSE} = 0.25 \\]", ["0.25"]),
    ("\\begin{equation} b = 0.5 \\end{equation}", ["0.5"]),
    ("\\placeholder{about 15 minutes}", ["15"]),
    # ways around the check a review found
    ("Truncation loses 1.25 in accuracy; the gap is 3 pt wide, and 7 ex-ante runs.",
     ["1.25", "3", "7"]),
    ("$24$ of the $45$ differences, $0{.}5$", ["24", "45", "0{.}5"]),
    ("\\href{http://example.org/run1}{the 88.81\\,\\% run}", ["88.81"]),
    ("\\newcommand{\\myacc}{88.81} and \\def\\other{12}", ["88.81", "12"]),
    # the other ways to define a macro, and counts typed in math with a sign or a percent
    ("\\providecommand{\\a}{88.81} \\DeclareRobustCommand{\\b}{12} \\gdef\\c{13} "
     "\\edef\\d{14} \\newcommand\\e{15}", ["88.81", "12", "13", "14", "15"]),
    ("$88\\%$, $-45$ and $+12$, but $-1$ and $0$", ["88\\%", "-45", "+12"]),
    # results typed in math with a percent sign, a unit or as a sample size (a review)
    ("The network reaches $88\\,\\%$ in float.", ["88"]),
    ("The network reaches $\\approx 88$\\,\\% in float.", ["88"]),
    ("On $n = 500$ test images the drop is $3$ points.", ["500", "3"]),
    ("The drop is $-3$ points, at $p < 10^{-3}$.", ["-3"]),
    ("Truncation loses $7$ points at $4$ bits.", ["7", "4"]),
    ("The subset holds $2 \\times 250$ images.", ["2", "250"]),
    ("the SQNR is $4\\cdot 10 + 2$\\,dB, $3$~s and $5$-bit", ["4", "10", "2", "3", "5"]),
    ("$N_{\\mathrm{test}} = 250$, $n=1{,}000$ and $0.5$ points", ["250", "1{,}000", "0.5"]),
])
def test_hand_typed_numbers_are_found(body, found):
    assert numbers(body) == found


@pytest.mark.parametrize("body", [
    "ResNet50 in INT8 on AVX2 and AVX512-VNNI, float32 and IMAGENET1K\\_V2",
    "an eight-bit model",
    "reaches \\driftAccNearestEvenEight\\,\\% against \\driftFloatAccuracy{}",
    "see Table~\\ref{tab:drift-int8}, Section~\\ref{sec:x2} and~\\cite{he2016,max1960}",
    "% 91.3 in a comment",
    "$1/12$, $2^{b-1}$, $10\\log_{10}$, $f(x_1, 2)$",
    "\\begin{equation} u = x/s + z_2 \\end{equation}",
    "\\studyfigure[0.49\\linewidth]{rounding}{regime_mse_lsb_8bit}\\\\[1ex]",
    "\\studytable{drift}{int8.tex} \\vspace{2mm} \\hspace*{0.5em}",
    "\\begin{tabular}{@{}l p{0.27\\linewidth}@{}} a \\end{tabular}",
    "\\begin{figure}[t] \\includegraphics[width=0.8\\textwidth]{a1.pdf} \\end{figure}",
    "\\begin{thebibliography}{99}\\bibitem{a} A. Title. 45(2):353--361, 1996."
    "\\end{thebibliography}",
    # formulas with a variable, or with no unit after them, are the theory's constants
    "bias $-(1-p_0)/2$\\,LSB, MSE $1/12$ \\& $1/3$, about $f(0)/6$, a $32\\times32$ input",
    "$0$ & $1/6$ & $1/3$ \\\\ and $b$ bits, $2^b$ codes, $z \\neq 0$ points away",
    "\\driftAccNearestEvenEight\\,\\% at $\\alpha$ and $(-1, 1)$ (a value)",
    # the model's constants with their units (they were flagged as typed results)
    "MSE $1/12$\\,LSB$^2$, bias $-1/2$\\,LSB, $1/3$\\,LSB$^2$, $\\frac{1}{4}$\\,LSB",
])
def test_allowed_digits_are_not_flagged(body):
    assert numbers(body) == []


def test_preamble_and_bibliography_are_not_prose():
    assert numbers("text", preamble="\\usepackage[margin=2.3cm]{geometry}\n"
                                    "\\setcounter{topnumber}{3}\n") == []
    # but a definition there is checked: it could replace a study's macro by a typed number
    assert numbers("text", preamble="\\renewcommand{\\driftFloatAccuracy}{99.99}\n") \
        == ["99.99"]
    assert numbers("text", preamble="\\renewcommand{\\topfraction}{0.9}\n"
                   "\\newcommand{\\box}[1]{\\parbox{\\dimexpr\\linewidth-2\\fboxsep}{#1}}\n"
                   "\\renewenvironment{table}[1][]{\\par}{\\par}\n") == []
    assert numbers("Since 1996 it holds.") == ["1996"]  # a year in prose is still typed


def test_what_the_title_page_prints_from_the_preamble_is_prose():
    """\\title, \\author, \\date and \\thanks sit in the preamble and print on the first
    page: a result typed there is typed into the paper."""
    assert numbers("text", preamble="\\title{Truncation costs 4.2 points}\n") == ["4.2"]
    assert numbers("text", preamble="\\title[Short, 88\\,\\%]{A title}\n"
                                    "\\author{A\\thanks{Funded 2024.}}\n\\date{May 31}\n") \
        == ["88", "2024", "31"]
    assert numbers("text", preamble="\\title{INT8 ResNet50:\\\\ in eight bits}\n\\date{}\n") \
        == []


def test_line_numbers_point_at_the_number():
    src = "\\begin{document}\nfirst line\nsecond with 42 here\n\\end{document}\n"
    (h,) = build.hand_typed_numbers(src)
    assert (h.line, h.number, h.context) == (3, "42", "second with 42 here")


def test_the_paper_has_no_hand_typed_number():
    sources = build.paper_sources()
    assert sources, "paper/*.tex not found"
    for path in sources:
        assert build.hand_typed_numbers(path.read_text(encoding="utf-8")) == [], path.name


def test_the_papers_predicted_drift_carries_the_quantized_weights():
    """E[Δy] = ΔW·E[x] + Ŵ·E[e_x] exactly (qerror.nn.correction, which computes it so); the
    section on predicted drift wrote W·E[e_x], the float weights, which at 3 bits moves the
    first layer's prediction from the measured +0.075 to +0.111
    (/work/runs/s39/review-nn-misc/probe_paper_what.py)."""
    import re

    from qerror.nn import correction

    assert "Ŵ · E[e_x]" in correction.__doc__
    text = (REPO / "paper" / "main.tex").read_text()
    terms = re.findall(r"(\\hat W|[^\s$]*)\\,E\[e_x\]", text)
    assert terms and all(t == r"\hat W" for t in terms), terms
