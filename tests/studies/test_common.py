"""studies._common: run folders (manifest, atomicity), study_main, paired timing ratios."""

import json

import numpy as np
import pytest

from studies import _common
from studies._common import RunDir


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "study"
    with pytest.raises(RuntimeError):
        with RunDir(out, "demo", [], {}) as run:
            run.write_text("part.csv", "a,b\n")
            raise RuntimeError("interrupted")
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_finished_run_replaces_the_old_one_only_when_complete(tmp_path):
    out = tmp_path / "study"
    with RunDir(out, "demo", ["--x"], {"k": 1}) as run:
        run.write_text("a.txt", "first")
        run.finish()
    with pytest.raises(RuntimeError):
        with RunDir(out, "demo", [], {}) as run:
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


def test_paired_ratio_alternates_and_divides():
    calls = []
    ratios, ta, tb = _common.paired_ratio(lambda: calls.append("a"), lambda: calls.append("b"),
                                          pairs=4, warmup=2)
    assert calls == ["a", "b"] * 6
    assert ratios.shape == ta.shape == tb.shape == (4,)
    np.testing.assert_array_equal(ratios, ta / tb)


def test_flush_denormal_restores_the_callers_setting():
    import torch

    from qerror.cpu import flush_denormal, flushing_denormals

    assert not flushing_denormals()
    with flush_denormal():
        assert flushing_denormals()
    assert not flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        with flush_denormal():
            assert flushing_denormals()
        assert flushing_denormals()
    finally:
        torch.set_flush_denormal(False)
