"""The set-up a fresh machine runs (README: `make run`, `make test`): pyproject.toml builds
without deprecated configuration and declares every package the code imports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package runs on 3.10 too

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def test_pyproject_uses_no_deprecated_setuptools_configuration():
    # `license = { text = ... }` is deprecated (due 2027-02-18): `pip install -e .` builds with
    # the newest setuptools, which refuses a deprecation once it is enforced
    # (setuptools builds the package; any environment that installed it has one)
    setuptools = pytest.importorskip("setuptools")
    config = pytest.importorskip("setuptools.config.pyprojecttoml")
    with warnings.catch_warnings():
        warnings.simplefilter("error", setuptools.SetuptoolsDeprecationWarning)
        config.apply_configuration(setuptools.dist.Distribution(), str(PYPROJECT))
    # and the build asks for a setuptools that reads the configuration so (SPDX license: 77)
    requires = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
    (bound,) = [m.group(1) for r in requires if (m := re.fullmatch(r"setuptools>=(\d+)", r))]
    assert int(bound) >= 77


# Where each part of the tree runs, and the extras installed there: the library on its own
# dependencies, the studies with `studies` (and the bench's optional peers), the paper with
# `paper`, the tests and scripts with `dev` (what the Makefile installs).
AREAS = {"qerror": ("",), "studies": ("", "studies", "peers"), "paper": ("", "paper"),
         "tests": ("", "dev"), "scripts": ("", "dev")}
FIRST_PARTY = {"qerror", "studies", "tests", "paper"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared(extras: tuple[str, ...]) -> set[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    out, todo = set(), list(extras)
    while todo:
        extra = todo.pop()
        reqs = project["dependencies"] if extra == "" else project["optional-dependencies"][extra]
        for req in reqs:
            if _name(req) == project["name"]:  # qerror[studies]: that extra's requirements
                todo += re.search(r"\[(.*)\]", req).group(1).split(",")
            else:
                out.add(_name(req))
    return out


def _third_party_imports(folder: Path) -> dict[str, set[str]]:
    import ast

    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names}:
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("area", sorted(AREAS))
def test_every_third_party_import_is_declared(area):
    # an import another package happens to pull in (PIL through torchvision) is still ours
    # to declare: the install step installs what pyproject.toml names, nothing else
    from importlib.metadata import packages_distributions

    declared, dists = _declared(AREAS[area]), packages_distributions()
    missing = {}
    for module, files in _third_party_imports(ROOT / area).items():
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(files)
    assert not missing, f"{area}: imported but not declared in pyproject.toml: {missing}"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_env_step_makes_a_venv_without_pip_again(tmp_path):
    # python3 -m venv on Debian/Ubuntu without python3-venv stops at ensurepip and leaves
    # .venv/bin/python behind; the env step once took that for a venv, and every later
    # `make run` stopped at "No module named pip" until the user removed .venv
    pytest.importorskip("ensurepip")
    venv = tmp_path / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    plan = subprocess.run(["make", "-n", "-s", "env", f"VENV={venv}", f"PYTHON={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout
    subprocess.run(["sh", "-c", plan.splitlines()[0]], cwd=ROOT, check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
