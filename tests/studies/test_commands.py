"""The commands the README and the docstrings tell a user to run are ones the studies take:
each ``python -m studies.NAME ...`` (also ``torchrun ... -m studies.NAME ...`` and a bare
``studies.NAME --option``) is run through its study's argument handling, every check a
study makes of its options before its work, and stopped where the work would start (the
output folder's check). A value in capitals stands for a path the text explains."""

import ast
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STUDIES = sorted(p.stem for p in (REPO / "studies").glob("*.py") if not p.stem.startswith("_"))

# an inline code span or a fenced block's line: `python -m studies.drift --images 200`
_FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
_SPAN = re.compile(r"``?([^`]+?)``?")
# studies.NAME as a module run, not studies.NAME.ATTRIBUTE; its arguments up to a comment,
# a parenthesis that explains a placeholder, or the end
_COMMAND = re.compile(r"(?<![\w.])studies\.([a-z][a-z_]*)(?![\w.<])([^#(]*)")


def commands(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """Every (study, argv) a text shows in its code spans and fenced blocks, in order,
    repeats left out; a line continued with a backslash is one command."""
    pieces = [line for block in _FENCE.findall(text)
              for line in block.replace("\\\n", " ").splitlines()]
    pieces += _SPAN.findall(_FENCE.sub("", text))
    found = []
    for piece in pieces:
        for match in _COMMAND.finditer(" ".join(piece.split())):
            argv = tuple(a for a in shlex.split(match.group(2)) if a != "...")
            if (match.group(1), argv) not in found:
                found.append((match.group(1), argv))
    return found


def docstrings(path: Path) -> list[str]:
    """A module's docstrings (its own, its classes' and its functions')."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [doc for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
            and (doc := ast.get_docstring(node))]


class _WorkStarts(Exception):
    """Raised where a study, its options accepted, would start its work."""


def _stop(*args, **kwargs):
    raise _WorkStarts


def run_until_work(study: str, argv, monkeypatch, tmp_path) -> str:
    """Run ``studies.<study>``'s main on ``argv`` until its work would start: "" when it gets
    there (or, for the ledger, which has no work to stop, when it succeeds), else what it
    printed on the way out."""
    module = importlib.import_module(f"studies.{study}")
    for name in ("check_out", "distributed"):  # the output folder; train's process group
        if hasattr(module, name):
            monkeypatch.setattr(module, name, _stop)
    if hasattr(module, "resolve_device"):  # a GPU the command names, on a machine without
        monkeypatch.setattr(module, "resolve_device", lambda *a, **k: torch.device("cpu"))
    monkeypatch.chdir(tmp_path)  # the ledger's --out FILE is written here
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = module.main(list(argv))
        except _WorkStarts:
            return ""
        except SystemExit as exit:
            status = exit.code
    said = err.getvalue().strip().splitlines()
    return "" if study == "ledger" and status == 0 else f"status {status}: {said[-1:]}"


def study_help(study: str) -> str:
    """What ``python -m studies.<study> --help`` prints."""
    module = importlib.import_module(f"studies.{study}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            module.main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0, f"studies.{study} --help exited with {exit.code}"
    return out.getvalue()


def _documented():
    sources = [REPO / "README.md", *sorted((REPO / "studies").glob("*.py")),
               *sorted((REPO / "qerror").rglob("*.py")), *sorted((REPO / "paper").glob("*.py"))]
    found = []
    for path in sources:
        texts = [path.read_text(encoding="utf-8")] if path.suffix == ".md" \
            else docstrings(path)
        for study, argv in (c for text in texts for c in commands(text)):
            if (path.relative_to(REPO).as_posix(), study, argv) not in found:
                found.append((path.relative_to(REPO).as_posix(), study, argv))
    return found


DOCUMENTED = _documented()


def test_the_extraction_finds_the_commands_as_written():
    text = ("Run `python -m studies.drift --images 200` or\n```sh\ntorchrun --nnodes 2 \\\n"
            "    -m studies.drift --data /d --device cuda   # eight GPUs\n```\n"
            "(`studies.train --stem conv3-pool --checkpoint F`, `python -m studies.compression "
            "--early-exit-run EE (EE: a run)`, ``torchrun --nproc-per-node N -m studies.drift "
            "...``, `studies.drift.KWAY_CHUNK`, `python -m studies.<name> --help`)")
    assert commands(text) == [
        ("drift", ("--data", "/d", "--device", "cuda")),
        ("drift", ("--images", "200")),
        ("train", ("--stem", "conv3-pool", "--checkpoint", "F")),
        ("compression", ("--early-exit-run", "EE")),
        ("drift", ())]
    readme = [c for c in DOCUMENTED if c[0] == "README.md"]
    assert ("README.md", "drift", ("--data", "/data/imagenet/val", "--device", "cuda",
                                   "--images", "49800", "--resample-images", "5000",
                                   "--modes", "nearest_even",
                                   "toward_zero", "--bits", "8", "--targets", "both")) in readme
    assert len({study for _, study, _ in readme}) >= 8


@pytest.mark.parametrize("where,study,argv", DOCUMENTED,
                         ids=[f"{w}:{s} {' '.join(a)}" for w, s, a in DOCUMENTED])
def test_a_documented_command_is_one_its_study_takes(where, study, argv, monkeypatch,
                                                     tmp_path):
    assert study in STUDIES, f"{where} names studies.{study}, which is no study"
    # spelt out as the study spells it (argparse takes a prefix, until an option is added)
    options = set(re.findall(r"--[a-z][a-z0-9-]*", study_help(study)))
    assert [a for a in argv if a.startswith("--") and a.split("=")[0] not in options] == []
    assert run_until_work(study, argv, monkeypatch, tmp_path) == ""


def test_an_option_the_study_lacks_is_found(monkeypatch, tmp_path):
    """The check is not vacuous: a misspelt option, a value of the wrong form and a
    combination the study refuses all stop before the work."""
    for study, argv, why in (("drift", ["--imagez", "200"], "unrecognized"),
                             ("drift", ["--images", "many"], "--images"),
                             ("drift", ["--remedy-bits", "6", "--bits", "8"], "not among"),
                             ("ledger", ["--force"], "--force replaces")):
        assert why in run_until_work(study, argv, monkeypatch, tmp_path)


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_answers_help(study):
    """The README: `python -m studies.<name> --help` for each study."""
    assert f"usage: python -m studies.{study}" in study_help(study)


def test_the_missing_data_message_names_the_studies_whose_download_fetches_it(monkeypatch,
                                                                             tmp_path):
    """Fashion-MNIST not found: the message said "a study's --download does so too", but
    only studies.train's and studies.dataset's fetch it; drift's (the main job's) is for
    ImageNet weights and is refused without --data, and the other studies have none."""
    from qerror import data

    message = data._ways_to_get_it()
    said = message[message.index(data.FETCH) + len(data.FETCH):]
    named = set(re.findall(r"studies\.([a-z_]+)", said))
    fetching = {study for study in STUDIES
                if re.search(r"--download\s+download Fashion-MNIST", study_help(study))}
    assert named == fetching == {"train", "dataset"}
    for study in sorted(named):
        assert run_until_work(study, ["--download"], monkeypatch, tmp_path) == ""
    assert "--download allows" in run_until_work("drift", ["--download"], monkeypatch, tmp_path)


def _readme_pieces() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in
            [line for block in _FENCE.findall(text) for line in block.splitlines()]
            + _SPAN.findall(_FENCE.sub("", text))]


def test_the_make_targets_paths_and_tests_the_readme_names_exist():
    """`make X`, a path in the repository (a build output: git-ignored) and a test named
    in the README are there to run or read."""
    import subprocess

    pieces = _readme_pieces()
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = {m.group(1) for p in pieces if (m := re.match(r"make ([\w-]+)", p))}
    assert {"run", "test", "paper", "bench"} <= named and named - targets == set()
    paths = {m.group(1) for p in pieces for m in re.finditer(
        r"(?<![\w./-])((?:qerror|studies|tests|paper|scripts|\.ci)/[\w./-]*)", p)}
    missing = [p for p in sorted(paths) if not (REPO / p).exists()
               and subprocess.run(["git", "check-ignore", "-q", p], cwd=REPO).returncode != 0]
    assert len(paths) > 20 and missing == []
    tests = "".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").rglob("test_*.py"))
    names = {m for p in pieces for m in re.findall(r"^test_\w+$|(?<=::)test_\w+", p)}
    assert names and [n for n in sorted(names) if f"def {n}(" not in tests] == []
    # the Makefile's own test paths (test-avx2's KERNEL_TESTS)
    for path, _, name in re.findall(r"(tests/[\w/]+\.py)(::)?(\w*)", makefile):
        assert (REPO / path).is_file() and f"def {name}(" in (REPO / path).read_text() \
            if name else (REPO / path).is_file(), path


def test_the_stats_functions_the_readme_says_return_a_result_return_one():
    """The README's row for qerror/stats.py says what "each returns" (statistic, p-value, CI,
    n and a verdict in words): every function it names before that says so returns a
    StatResult. It named mcnemar_resolution, mcnemar_power, units_to_resolve, tail_share and
    median_ranks there, which return a McNemarResolution, floats and a tuple."""
    import typing

    from qerror import stats

    text = (REPO / "README.md").read_text(encoding="utf-8")
    row = re.search(r"^\| `qerror/stats\.py` \|(.*)\|$", text, re.M).group(1)
    claimed = re.findall(r"`(\w+)`", row[:row.index("each returns statistic, p-value")])
    assert claimed
    returns = {name: typing.get_type_hints(getattr(stats, name))["return"] for name in claimed}
    assert {name: kind for name, kind in returns.items()
            if not (isinstance(kind, type) and issubclass(kind, stats.StatResult))} == {}
