"""python -m studies.bench: the smoke preset measures every row."""


import argparse
import math
import re

import numpy as np
import pandas as pd
import pytest

from studies import bench


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    assert bench.main(["--smoke", "--pairs", "1", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "bench.csv")
    measured = frame.ratio_median.notna()
    assert (frame.ratio_median[measured] > 0).all() and len(frame) >= 15
    # only a tiny float forward's memory growth may be 0 (a ratio that cannot be formed),
    # and the wisardpkg peer is absent where the optional extra is not installed
    unmeasured = frame[~measured]
    peer = unmeasured.group == "wisard"
    assert set(unmeasured[~peer].name) <= {n for n in frame.name if "peak memory" in n}
    assert unmeasured[peer].note.str.startswith("not measured: ").all()
    assert (frame.group == "wisard").sum() == 1
    # the instrument's compiled sums against torch's, on an 8×8 and a 2×2 map
    assert (frame.candidate == "difference_sums, compiled loop").sum() == 2
    # the goal's two rows again without the local error, against the same bare passes
    local = frame[frame.candidate.str.endswith("(local_samples=0)")]
    assert sorted(local.candidate) == ["measure (local_samples=0)",
                                       "measure_many (local_samples=0)"]
    assert local.goal.isna().all() and (local.ratio_median > 0).all()
    # a smoke run judges no goal (its problems are smaller than the goals are stated for)
    assert frame.goal.notna().any() and frame.meets_goal.isna().all()
    assert frame.goal_verdict.isna().all()


def test_wisard_peer_row_when_wisardpkg_is_installed(fashion_idx, monkeypatch):
    pytest.importorskip("wisardpkg")
    from qerror import data

    monkeypatch.setenv(data.ENV_VAR, str(fashion_idx(train=6100, test=300)))
    args = argparse.Namespace(smoke=True, pairs=1, seed=0)
    (row,) = bench.bench_wisard(args)
    assert row.ratio_median > 0 and row.pairs == 1
    assert row.baseline == "wisardpkg 1.6.3"
    # the note grew a paired test and the bleaching choice's cost; the fullmatch was not
    # updated because wisardpkg is absent where the suite usually runs (make bench has it)
    assert re.fullmatch(r"100 train / 200 test images; accuracy ours [\d.]+% \[[\d., ]+\], "
                        r"peer [\d.]+% \[[\d., ]+\] \(95% Wilson\), McNemar p [\d.e+-]+; "
                        r"ours includes choosing its bleaching threshold on \d+ validation "
                        r"images \(a pass over them\), the peer's classify bleaches by its own "
                        r"rule", row.note), row.note


def test_a_named_early_exit_run_is_checked_before_any_timing(tmp_path, capsys):
    """--early-exit-run named with groups that do not read it, or naming no run, is refused
    before any group runs (it was ignored, or refused after the other groups' timings)."""
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as info:
        bench.main(["--only", "empirical", "--early-exit-run", str(tmp_path / "none"),
                    "--out", str(out)])
    assert info.value.code == 2
    assert "only the early_exit group reads it" in capsys.readouterr().err
    ran = []
    real = bench.GROUPS["empirical"]
    bench.GROUPS["empirical"] = lambda args: ran.append(1) or real(args)
    try:
        code = bench.main(["--only", "empirical", "--only", "early_exit", "--early-exit-run",
                           str(tmp_path / "none"), "--out", str(out)])
    finally:
        bench.GROUPS["empirical"] = real
    assert code == 2 and not ran and not out.exists()
    assert "not a finished, non-smoke" in capsys.readouterr().err


def test_a_named_run_whose_baseline_changed_is_refused_before_any_timing(tmp_path, capsys):
    """Its checkpoint's sha256 was checked only inside the early_exit group, after the other
    groups had been timed."""
    import hashlib
    import json

    import torch

    run = tmp_path / "ee"
    run.mkdir()
    ckpt = tmp_path / "baseline.pt"
    ckpt.write_text("a baseline retrained since the run")
    (run / "summary.json").write_text(json.dumps({
        "smoke": False, "head_policy": "frozen",
        "int8_rule": {"policy": "max_softmax", "thresholds": [0.9], "temperatures": [1, 1]},
        "operating_points": [{"system": "int8_early_exit", "policy": "frozen"}]}))
    torch.save({}, run / "exit_model.pt")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    (run / "manifest.json").write_text(json.dumps({
        "study": "early_exit", "argv": [], "config": {"arch": "resnet50", "smoke": False},
        "model": {"checkpoint": str(ckpt), "sha256": "0" * 64},
        "outputs": {n: sha(run / n) for n in ("summary.json", "exit_model.pt")}}))
    ran = []
    real = bench.GROUPS["empirical"]
    bench.GROUPS["empirical"] = lambda args: ran.append(1) or real(args)
    out = tmp_path / "bench"
    try:
        code = bench.main(["--only", "empirical", "--only", "early_exit", "--early-exit-run",
                           str(run), "--out", str(out)])
    finally:
        bench.GROUPS["empirical"] = real
    assert code == 2 and not ran and not out.exists()
    assert "is gone or another file now" in capsys.readouterr().err


def test_a_compile_failure_is_a_row_and_a_ctrl_c_inside_it_is_not(monkeypatch):
    """torch.compile's trace can turn a Ctrl-C into another error (qerror.interrupts): that
    is raised again, not recorded as the backend's failure."""
    import torch

    from qerror.interrupts import note_interrupt

    model, x = torch.nn.Linear(3, 2), torch.randn(4, 3)

    def fails(*args, **kwargs):
        raise TypeError("the backend cannot take this")

    monkeypatch.setattr(torch, "compile", fails)
    row = bench._compiled_row("demo", model, x, lambda: None, lambda m, t: m(t), 1, None)
    assert "torch.compile failed on this machine: TypeError" in row.note

    def interrupted(*args, **kwargs):
        note_interrupt()
        raise TypeError('failed to unpack the object with error "KeyboardInterrupt"')

    monkeypatch.setattr(torch, "compile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench._compiled_row("demo", model, x, lambda: None, lambda m, t: m(t), 1, None)


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 11, 15, 40])
def test_a_goal_is_decided_by_the_interval_of_the_median(n):
    """The interval of the median ratio is the pair of order statistics x_(k), x_(n-k+1)
    with the largest k whose coverage 1 - 2 P(Bin(n, 1/2) <= k - 1) reaches the level
    (worked out here from binomial coefficients); none below five pairs. The verdict is
    "met" only when the whole interval lies at or below the goal."""
    ratios = np.random.default_rng(n).lognormal(0.2, 0.1, n)
    cover = [1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n for k in range(n + 1)]
    ks = [k for k in range(1, (n + 1) // 2 + 1) if cover[k] >= bench.MEDIAN_LEVEL]
    lo, hi = bench.median_interval(ratios)
    if not ks:
        assert n < 5 and math.isnan(lo) and math.isnan(hi)
        assert bench.goal_verdict(lo, hi, 1.3) == "not resolved"
        return
    k, x = max(ks), np.sort(ratios)
    assert (lo, hi) == (x[k - 1], x[n - k])
    assert bench.goal_verdict(lo, hi, hi) == "met"
    assert bench.goal_verdict(lo, hi, np.nextafter(lo, 0)) == "not met"
    assert bench.goal_verdict(lo, hi, float(np.median(ratios))) == "not resolved"
    assert bench.goal_verdict(lo, hi, None) is None
    row = bench.make_row("g", "r", "a", "b", 1.0, ratios, ratios, np.ones(n))
    assert (row.median_lo, row.median_hi) == (lo, hi)
    assert row.goal_verdict == bench.goal_verdict(lo, hi, 1.0)
