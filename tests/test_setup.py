"""The set-up a fresh machine runs (README: `make run`, `make test`): pyproject.toml builds
without deprecated configuration."""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def test_pyproject_uses_no_deprecated_setuptools_configuration():
    # `license = { text = ... }` is deprecated (due 2027-02-18): `pip install -e .` builds with
    # the newest setuptools, which refuses a deprecation once it is enforced
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error", setuptools.SetuptoolsDeprecationWarning)
        apply_configuration(Distribution(), str(PYPROJECT))
    # and the build asks for a setuptools that reads the configuration so (SPDX license: 77)
    requires = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
    (bound,) = [m.group(1) for r in requires if (m := re.fullmatch(r"setuptools>=(\d+)", r))]
    assert int(bound) >= 77
