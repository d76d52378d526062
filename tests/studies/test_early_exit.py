"""python -m studies.early_exit: smoke run end to end, threshold 1.0, bad input.

The byte-identical rerun and the command-line table live in test_bad_input.py with the
other studies'. The compiled INT8 path (latency rows) is marked ``slow``: inductor compiles
three graphs per stage, minutes on a shared CPU.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from qerror.nn.models import Arch, fashion_resnet, save_checkpoint
from studies import early_exit
from studies._common import sha256_file

OUTPUTS = ("macs.csv", "heads.csv", "calibration.csv", "sweeps.csv", "operating_points.csv",
           "exits_per_class.csv", "rounding.csv", "sim_vs_real.csv", "compile_times.csv",
           "goals.csv", "exit_model.pt", "operating_points.tex", "heads.tex",
           "calibration.tex", "goals.tex", "macros.tex", "summary.json", "sweeps.pdf",
           "sweeps.png", "calibration.pdf", "exits_per_class.pdf", "selection_cv.csv",
           "selection_cv.tex")


@pytest.fixture
def fashion_root(fashion_idx):
    """Synthetic Fashion-MNIST: 100 training images after the validation and calibration
    splits, 100 test images; nothing else is found."""
    return fashion_idx(train=6100, test=100)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run shared by the output checks (about half a minute)."""
    import numpy as np

    from qerror import data

    tmp = tmp_path_factory.mktemp("ee")
    mp = pytest.MonkeyPatch()
    try:
        mp.delenv(data.ENV_VAR, raising=False)
        mp.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
        mp.setattr(data, "DEBIAN_DIR", tmp / "no-debian")
        mp.setattr(data, "SIZES", {"train": 6100, "test": 100})
        root = tmp / "fm"
        root.mkdir()
        rng = np.random.default_rng(0)
        for split, n in (("train", 6100), ("test", 100)):
            img, lbl = data.FILES[split]
            data.write_idx(root / f"{img}.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            data.write_idx(root / f"{lbl}.gz", rng.integers(0, 10, n, dtype=np.uint8))
        out = tmp / "run"
        assert early_exit.main(["--smoke", "--data-root", str(root), "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out


def test_smoke_run_writes_every_output_and_its_manifest(smoke_run):
    out = smoke_run
    manifest = json.loads((out / "manifest.json").read_text())
    for name in OUTPUTS:
        assert (out / name).is_file(), name
        assert manifest["outputs"][name] == sha256_file(out / name)
    assert manifest["model"]["model"] == "fashion-resnet18-untrained-smoke"
    assert manifest["data"]["test_images"] == 64 and manifest["config"]["smoke"]
    assert manifest["timing_outputs"] == ["compile_times.csv"]  # uncompiled: no latency
    # The default selection: a paired non-inferiority test whose margin, with the headline
    # policy, five-fold cross-validation chose: the first procedure by the selection order
    # of its out-of-fold accuracy and MACs and whether it qualified.
    cfg = manifest["config"]
    assert (cfg["select"], cfg["select_margin"], cfg["select_alpha"], cfg["cv_folds"]) == \
        ("cv", None, early_exit.ALPHA, 5)
    assert cfg["cv_margins"] == pytest.approx([0.005, 0.004, 0.003, 0.002, 0.001])
    assert "5-fold cross-validation" in cfg["operating_point_rule"]
    cv = pd.read_csv(out / "selection_cv.csv")
    assert len(cv) == 4 * 5 and cv.chosen.sum() == 1
    # ties to the smaller margin
    order = [(early_exit.selection_order(a, m, bool(q)), margin)
             for a, m, q, margin in zip(cv.accuracy, cv.macs_fraction, cv.met, cv.margin)]
    best = cv.iloc[min(range(len(cv)), key=order.__getitem__)]
    assert best.chosen
    # each procedure qualified at the margin less what the test split's TOST needs of it
    assert (cv.qualifying_margin < early_exit.MARGIN).all()
    assert (cv.met == ((cv.qualifying_margin > 0) & (cv.p_qualifying < early_exit.ALPHA))).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["head_policy"] == best.policy
    assert summary["select_margin"] == pytest.approx(best.margin)
    assert "paired one-sided test against FP32 full at $\\alpha=0.05$" in \
        (out / "operating_points.tex").read_text()
    assert f"({100 * best.margin:g} points here)" in (out / "operating_points.tex").read_text()
    assert f"\\newcommand{{\\earlyExitSelectMargin}}{{{100 * best.margin:g}}}" in \
        (out / "macros.tex").read_text()
    assert not list(out.parent.glob(".run.partial*"))
    # Smoke outputs say so, and judge no goal.
    goals = pd.read_csv(out / "goals.csv")
    assert len(goals) == 5 and goals.met.isna().all()
    assert goals.verdict.str.startswith("not judged: smoke").all()
    note = early_exit.smoke_note(False, 64)
    assert note.startswith("smoke: an untrained model") and "64 test images" in note
    assert manifest["config"]["evidence"] == note
    for name in ("sweeps.csv", "operating_points.csv", "heads.csv"):
        assert (pd.read_csv(out / name).evidence == note).all()
    assert "smoke run: not evidence" in (out / "goals.tex").read_text()
    assert "\\newcommand{\\earlyExitSmoke}{true}" in (out / "macros.tex").read_text()
    summary_head = json.loads((out / "summary.json").read_text())["head_policy"]
    assert f"\\newcommand{{\\earlyExitHeadPolicy}}{{{summary_head}}}" in \
        (out / "macros.tex").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] and summary["evidence"] == note
    # The headline's distance from FP32 full on validation and on test, and how many
    # standard errors of their difference apart they are.
    shift = summary["headline_val_vs_test"]
    assert shift["val_se"] > 0 and shift["test_se"] > 0
    assert shift["z"] == pytest.approx((shift["val_delta"] - shift["test_delta"])
                                       / math.hypot(shift["val_se"], shift["test_se"]))
    (head,) = [p for p in summary["operating_points"] if p["system"] == "int8_early_exit"
               and p["policy"] == summary["head_policy"]]
    assert shift["test_delta"] == pytest.approx(head["delta_vs_fp32_full"])
    # Temperatures by both objectives; the rules use --calibration's (default nll); the
    # isotonic map on top is fitted on validation, where it leaves every bin calibrated.
    cal = pd.read_csv(out / "calibration.csv")
    assert manifest["config"]["calibration"] == "nll" and (cal.objective == "nll").all()
    assert (cal.temperature == cal.temperature_nll).all()
    assert (cal.ece_after == cal.ece_after_nll).all() and cal.ece_after_ece.notna().all()
    assert (cal[cal.split == "val"].ece_after_isotonic < 1e-9).all()
    assert cal[cal.split == "test"].ece_after_isotonic.notna().all()
    int8 = cal[(cal.system == "int8") & (cal.split == "val")].sort_values("exit")
    assert summary["int8_rule"]["temperatures"] == pytest.approx(list(int8.temperature))
    for macro in ("EceAfterMaxIntNll", "EceAfterMaxIntEce", "CalibrationObjective",
                  "EceAfterMaxIntIsotonic", "ValAccHead", "ValAccFull", "ValDeltaHead",
                  "DeltaHead", "ShiftZ", "ValSeHead", "SeHead"):
        assert f"\\newcommand{{\\earlyExit{macro}}}" in (out / "macros.tex").read_text()
    # Both head-training variants, every exit, both splits.
    heads = pd.read_csv(out / "heads.csv")
    assert set(heads.variant) == {"frozen", "joint"} and set(heads.split) == {"val", "test"}
    assert sorted(heads.exit.unique()) == [0, 1, 2, 3]
    last = heads[(heads.split == "test") & (heads.exit == 3)].set_index("variant").accuracy
    for variant in ("frozen", "joint"):  # the paper's sentence on what joint tuning raises
        assert (f"\\newcommand{{\\earlyExitLastTest{variant.capitalize()}}}"
                f"{{{100 * last[variant]:.2f}}}") in (out / "macros.tex").read_text()
    # Every system and policy was swept and has an operating point.
    points = pd.read_csv(out / "operating_points.csv")
    assert {f"{s}_early_exit" for s in early_exit.SYSTEMS} | {"fp32_full", "int8_full"} \
        == set(points.system)
    assert (points.acc_lo <= points.accuracy).all() and (points.accuracy <= points.acc_hi).all()
    # Shared and per-exit thresholds for each system and policy; on the validation split
    # (where both were chosen) the per-exit rule is never worse by the selection order.
    ee = points[points.system.str.endswith("_early_exit")]
    policies = [p.value for p in early_exit.ExitPolicy]
    assert sorted(set(ee.policy)) == sorted(policies + [f"{p} per exit" for p in policies])
    assert len(ee) == 4 * len(early_exit.SYSTEMS)
    for (system, policy), d in ee.groupby(["system", "policy"]):
        assert len(d) == 1 and len(d.thresholds.iloc[0].split("/")) == 3
    for policy in policies:
        shared = ee[ee.policy == policy].set_index("system")
        fine = ee[ee.policy == f"{policy} per exit"].set_index("system")
        for system in shared.index:
            a, b = shared.loc[system], fine.loc[system]
            assert b.met_rule >= a.met_rule
            if a.met_rule and b.met_rule:
                assert (b.val_mean_macs, -b.val_accuracy) <= (a.val_mean_macs, -a.val_accuracy)
            elif not a.met_rule and not b.met_rule:
                assert b.val_accuracy >= a.val_accuracy
    per_class = pd.read_csv(out / "exits_per_class.csv")
    for _, d in per_class.groupby("system"):
        assert d["count"].sum() == 64
    # Each simulation against real INT8, beside the float network (the baseline a
    # simulation must beat) and the real runner that drops exited samples.
    sim = pd.read_csv(out / "sim_vs_real.csv").set_index("simulation")
    assert list(sim.index) == ["nearest_even", "toward_zero", "fp32", "int8_runner"]
    assert (sim.images == 64).all()
    assert (sim.filter(like="exits_").sum(axis=1) == 64).all()
    for name in ("Fp", "IntEightRunner"):
        assert f"\\newcommand{{\\earlyExitSameExit{name}" in (out / "macros.tex").read_text()


def test_threshold_one_is_the_full_model(smoke_run):
    """At threshold 1.0 every sample takes the last exit: the FP32 early-exit network's
    accuracy is the baseline's own (its last exit is the frozen baseline), at the full
    network's MACs plus the heads'."""
    sweeps = pd.read_csv(smoke_run / "sweeps.csv")
    points = pd.read_csv(smoke_run / "operating_points.csv").set_index("system")
    macs = pd.read_csv(smoke_run / "macs.csv")
    at_one = sweeps[sweeps.threshold == 1.0]
    assert len(at_one) == 2 * 2 * len(early_exit.SYSTEMS)  # policies x splits x systems
    assert (at_one.exit3 == at_one[["exit0", "exit1", "exit2", "exit3"]].sum(axis=1)).all()
    assert (at_one[["exit0", "exit1", "exit2"]] == 0).all().all()
    assert (at_one.mean_macs == macs.macs.iloc[-1]).all()
    fp32 = at_one[(at_one.system == "fp32") & (at_one.split == "test")]
    assert (fp32.accuracy == points.loc["fp32_full", "accuracy"]).all()


def test_a_model_without_the_expected_stages_is_refused(fashion_root, tmp_path, monkeypatch,
                                                        capsys):
    def not_a_resnet(args, data_root):
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(10)), {}

    monkeypatch.setattr(early_exit, "load_backbone", not_a_resnet)
    out = tmp_path / "run"
    code = early_exit.main(["--smoke", "--data-root", str(fashion_root), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot attach exit heads to this model" in err and "layer1" in err
    assert not out.exists() and not list(tmp_path.glob(".run.partial*"))


def test_a_checkpoint_of_another_architecture_is_refused(fashion_root, tmp_path, capsys):
    ckpt = tmp_path / "r18.pt"
    torch.manual_seed(0)
    save_checkpoint(fashion_resnet(Arch.RESNET18), ckpt, arch="resnet18", stem="imagenet",
                    config={}, metrics={})
    out = tmp_path / "run"
    code = early_exit.main(["--smoke", "--arch", "resnet50", "--checkpoint", str(ckpt),
                            "--data-root", str(fashion_root), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "valid checkpoint (its sha256 matches) of another model: resnet18" in err
    assert not out.exists()


def _held_out_checkpoint(path, val: int, calib: int):
    """A ResNet18 checkpoint whose training held out ``val`` validation and ``calib``
    calibration images (studies.train records them in its recipe)."""
    torch.manual_seed(0)
    save_checkpoint(fashion_resnet(Arch.RESNET18), path, arch="resnet18", stem="imagenet",
                    config={"recipe": {"val_split": val, "calib_split": calib}}, metrics={})
    return path


@pytest.mark.parametrize("option", ["--val-images", "--calib-images"])
def test_more_images_than_the_checkpoints_held_out_split_is_refused(option, fashion_root,
                                                                   tmp_path, capsys):
    """A checkpoint trained beside 40 validation and 20 calibration images has no more: the
    run took those and its manifest recorded the 50 asked for."""
    ckpt = _held_out_checkpoint(tmp_path / "held.pt", 40, 20)
    out = tmp_path / "run"
    code = early_exit.main(["--smoke", "--checkpoint", str(ckpt), option, "50",
                            "--data-root", str(fashion_root), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    held = {"--val-images": "validation split holds 40", "--calib-images":
            "calibration split holds 20"}[option]
    assert f"{option} 50: " in err and held in err and "give at most" in err
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_the_manifest_records_the_images_a_smaller_held_out_split_leaves(fashion_root,
                                                                         tmp_path):
    """The smoke defaults (64 validation, 32 calibration images) from a checkpoint trained
    beside 40 and 20: the manifest's configuration said 64 and 32."""
    ckpt = _held_out_checkpoint(tmp_path / "held.pt", 40, 20)
    out = tmp_path / "run"
    assert early_exit.main(["--smoke", "--checkpoint", str(ckpt), "--cv-folds", "2",
                            "--thresholds", "0.5", "1", "--data-root", str(fashion_root),
                            "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for split, n in (("val", 40), ("calib", 20), ("test", 64), ("train", 64)):
        assert manifest["data"][f"{split}_images"] == n, split
        assert manifest["config"][f"{split}_images"] == n, split


def test_a_smoke_run_on_a_checkpoint_does_not_say_untrained():
    """--smoke --checkpoint F ran the trained model and wrote "untrained tiny model" into
    every table's evidence column."""
    note = early_exit.smoke_note(True, 300)
    assert "untrained" not in note and "the given checkpoint" in note
    assert "300 test images" in note and note.endswith("not evidence for any goal")


@pytest.mark.parametrize("args, message", [
    (["--latency-pairs", "5"], "--latency-pairs would change nothing: latency is measured "
                               "on compiled graphs only"),
    (["--distill", "0", "--distill-temperature", "3"],
     "--distill-temperature would change nothing: --distill 0"),
    (["--joint-epochs", "0", "--joint-weights", "2", "2", "2", "2"],
     "--joint-weights would change nothing: --joint-epochs 0"),
    (["--select", "estimate", "--cv-folds", "7"],
     "--cv-folds would change nothing: --select estimate does not cross-validate"),
])
def test_options_that_would_change_nothing_are_refused(args, message, tmp_path, capsys):
    """They were accepted, ignored, and (but for --cv-folds) written to the manifest as if
    used."""
    with pytest.raises(SystemExit) as exc:
        early_exit.main(["--smoke", *args, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_thresholds_outside_the_unit_interval_are_refused(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        early_exit.main(["--smoke", "--thresholds", "0.5", value, "--out",
                         str(tmp_path / "run")])
    assert exc.value.code == 2
    assert f"--thresholds: must be in [0, 1], got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_default_thresholds_cover_the_unit_interval_and_crowd_near_one():
    t = early_exit.default_thresholds(21)
    assert t[0] == 0.0 and t[-1] == 1.0 and t == sorted(set(t))
    assert sum(x > 0.99 for x in t) >= 8  # where a trained network's confidences lie


@pytest.mark.slow
def test_compiled_smoke_run_measures_latency(fashion_root, tmp_path):
    out = tmp_path / "run"
    assert early_exit.main(["--smoke", "--compile", "--latency-pairs", "20", "--data-root",
                            str(fashion_root), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"latency.csv", "goals.csv", "goals.tex", "compile_times.csv"} <= set(
        manifest["timing_outputs"])
    lat = pd.read_csv(out / "latency.csv")
    assert len(lat) == 5 and (lat.ratio_median > 0).all()
    assert set(lat.candidate) == {"int8 full", "int8 early exit"}
    times = pd.read_csv(out / "compile_times.csv")
    assert (times.compile_s > 0).all()
    summary = json.loads((out / "summary.json").read_text())
    assert all(sum(lowered.values()) > 0 for lowered in summary["lowered"])


def _results(delta_ci, macs_fraction, ece_max, images=10_000):
    """The parts of the study's results that the goals read."""
    points = pd.DataFrame([{
        "system": "int8_early_exit", "policy": "max-softmax", "images": images,
        "delta_vs_fp32_full": sum(delta_ci) / 2, "tost_ci_lo": delta_ci[0],
        "tost_ci_hi": delta_ci[1],
        # each one-sided p below alpha exactly when its end of the 1 - 2 alpha CI is inside
        "tost_p_below": 0.01 if delta_ci[0] > -early_exit.MARGIN else 0.3,
        "tost_p_above": 0.02 if delta_ci[1] < early_exit.MARGIN else 0.4,
        "tost_p": max(0.01 if delta_ci[0] > -early_exit.MARGIN else 0.3,
                      0.02 if delta_ci[1] < early_exit.MARGIN else 0.4),
        "equivalent": -early_exit.MARGIN < delta_ci[0] and delta_ci[1] < early_exit.MARGIN,
        "macs_fraction": macs_fraction}])
    calibration = pd.DataFrame([{"system": "int8", "split": "test", "objective": "nll",
                                 "ece_after_isotonic": e, "ece_after": 2 * e,
                                 "ece_after_nll": 2 * e, "ece_after_ece": 3 * e}
                                for e in (ece_max / 2, ece_max)])
    return {"points": points, "head_policy": "max-softmax", "calibration": calibration,
            "latency": None}


def test_goals_are_judged_on_the_whole_test_split_only():
    met = early_exit.goals(_results((-0.003, 0.002), 0.4, 0.015), smoke=False,
                           whole_test=True)
    assert list(met.verdict) == ["met", "met", "met", "not measured", "not measured"]
    # the calibration goal is judged on the isotonic map and names both temperatures' ECE
    assert met.measured[2] == ("max 1.50% (isotonic map of the max-softmax confidence at the "
                               "rules' temperatures, fitted on validation; temperature "
                               "alone: NLL's T max 3.00%, ECE's T max 4.50%)")
    assert met.measured[0] == ("-0.05 points, 90% CI [-0.30, +0.20], TOST p=0.020 (one-sided "
                               "p 0.010 below, 0.020 above: both one-sided tests pass)")
    # better than the reference by possibly more than the margin: not met, and said so
    above = early_exit.goals(_results((0.002, 0.007), 0.4, 0.015), smoke=False,
                             whole_test=True)
    assert above.verdict[0] == "not met"
    assert above.measured[0].endswith(
        "(one-sided p 0.010 below, 0.40 above: shown not to be worse than FP32 full by the "
        "margin, but not shown to be better by less than it: the early exit may be better by "
        "more than the margin)")
    missed = early_exit.goals(_results((-0.006, 0.001), 0.6, 0.025), smoke=False,
                              whole_test=True)
    assert list(missed.verdict[:3]) == ["not met"] * 3 and list(missed.met[:3]) == [False] * 3
    part = early_exit.goals(_results((-0.003, 0.002), 0.4, 0.015, images=500), smoke=False,
                            whole_test=False)
    assert part.verdict[:3].str.startswith("not judged: 500 test images").all()
    assert part.met.isna().all()


def test_the_tost_goal_prints_its_p_on_its_side_of_alpha():
    """A TOST p of 0.0496 (goal met) was printed 0.050, as a p of 0.0504 (not met) is."""
    res = _results((-0.003, 0.002), 0.4, 0.015)
    res["points"].loc[0, ["tost_p", "tost_p_above"]] = 0.0496
    met = early_exit.goals(res, smoke=False, whole_test=True)
    assert met.verdict[0] == "met"
    assert "TOST p=0.0496 (one-sided p 0.010 below, 0.0496 above: both" in met.measured[0]


def test_the_operating_points_table_prints_the_tost_p_on_its_side_of_alpha():
    """The table's "TOST p" beside "equivalent": 0.0496 (yes) was "0.05", as 0.0504 (no)."""
    pts = pd.DataFrame([{"system": "int8_early_exit", "policy": "max-softmax",
                         "thresholds": "0.9", "val_accuracy": 0.9, "accuracy": 0.9,
                         "acc_lo": 0.89, "acc_hi": 0.91, "macs_fraction": 0.3,
                         "delta_vs_fp32_full": 0.001, "mcnemar_p": 0.5, "tost_p": p,
                         "equivalent": p < early_exit.ALPHA} for p in (0.0496, 0.0504, 0.2)])
    table = early_exit.operating_points_table(pts)
    assert list(zip(table["TOST p"], table.equivalent)) == [("0.0496", "yes"), ("0.05", "no"),
                                                            ("0.2", "no")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_any_output(fashion_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = early_exit.main(["--smoke", "--device", "cuda", "--data-root", str(fashion_root),
                            "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "device cuda was asked for" in err and "--device cpu" in err
    assert not out.exists() and not list(tmp_path.glob(".run*"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_smoke_run_trains_on_the_gpu_and_quantizes_on_the_cpu(fashion_root, tmp_path):
    out = tmp_path / "run"
    assert early_exit.main(["--smoke", "--device", "cuda", "--data-root", str(fashion_root),
                            "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["device"] == "cuda"
    assert manifest["precision"] == {"cudnn_allow_tf32": False,
                                     "cuda_matmul_allow_tf32": False}
    points = pd.read_csv(out / "operating_points.csv")
    assert {"fp32_full", "int8_full", "int8_early_exit"} <= set(points.system)


def test_too_few_steps_for_the_one_cycle_schedule_is_refused_with_what_to_change(
        fashion_root, tmp_path, capsys):
    # 64 images in batches of 32 for one epoch: 2 steps, too few for a one-cycle warm-up
    out = tmp_path / "run"
    code = early_exit.main(["--smoke", "--head-epochs", "1", "--data-root", str(fashion_root),
                            "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "[early_exit] error: 2 steps are too few for the one-cycle schedule" in err
    assert "train on more samples or epochs" in err
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_equivalence_sides_name_the_failing_half_of_the_tost():
    """The goal's words for each outcome of the two one-sided tests, from real counts: an
    early exit right on 60 more of 10,000 images than the reference passes the lower test
    and fails the upper one (it may be better by more than half a point)."""
    n = 10_000
    better = early_exit.paired_test(torch.tensor([True] * 260 + [False] * 200 + [True] * (n - 460)),
                                    torch.tensor([False] * 260 + [True] * 200 + [True] * (n - 460)))
    eq = better[2]
    assert better[:2] == (260, 200)
    assert eq.p_low < early_exit.ALPHA <= eq.p_high
    assert early_exit.equivalence_sides(eq.p_low, eq.p_high).startswith(
        "shown not to be worse than FP32 full by the margin, but not shown to be better by "
        "less than it")
    assert early_exit.equivalence_sides(0.01, 0.01) == "both one-sided tests pass"
    assert early_exit.equivalence_sides(0.5, 0.01).startswith(
        "shown not to be better than FP32 full by the margin, but not shown to be worse by")
    assert early_exit.equivalence_sides(0.5, 0.5) == "neither one-sided test passes"
    # the boundary: a p-value equal to alpha does not pass
    assert early_exit.equivalence_sides(early_exit.ALPHA, early_exit.ALPHA) == \
        "neither one-sided test passes"


def test_speed_goals_are_decided_on_the_interval_of_the_median():
    """The throughput and batch-1 latency goals take the bench's verdict on the median
    ratio's distribution-free interval: met, not met, or not resolved by the pairs (the
    median alone once decided them)."""
    from studies import bench

    rng = np.random.default_rng(0)

    def rows(batch_ratios, one_ratios):
        out = []
        for name, cand, base, goal, r in (
                ("batch 256, time per batch, x", "int8 early exit", "fp32 eager full", 0.2,
                 batch_ratios),
                ("batch 1, latency, x", "int8 early exit", "int8 full", 1.0, one_ratios)):
            out.append(bench.make_row("early_exit", name, cand, base, goal, np.asarray(r),
                                      np.asarray(r), np.ones(len(r))))
        return out

    res = _results((-0.003, 0.002), 0.4, 0.015)
    clear = rows([0.10, 0.11, 0.09, 0.10, 0.12, 0.10], rng.uniform(0.5, 0.6, 50))
    got = early_exit.goals({**res, "latency": clear}, smoke=False, whole_test=True)
    assert list(got.verdict[3:]) == ["met", "met"] and list(got.met[3:]) == [True, True]
    # 6 pairs: [min, max], coverage 1 - 2^-5 (sought at 90 %)
    assert "median's 96.9% interval 8.33x to 11.11x" in got.measured[3]
    # medians below the goal, intervals across it: not resolved, and not called met
    across = rows([0.1, 0.3, 0.15, 0.25, 0.18], rng.uniform(0.8, 1.15, 50))
    got = early_exit.goals({**res, "latency": across}, smoke=False, whole_test=True)
    assert list(got.verdict[3:]) == ["not resolved", "not resolved"]
    assert got.met[3:].isna().all()
    few = rows([0.1, 0.1], [0.5, 0.5, 0.5])
    got = early_exit.goals({**res, "latency": few}, smoke=False, whole_test=True)
    assert list(got.verdict[3:]) == ["not resolved"] * 2
    assert "too few pairs for an interval of the median" in got.measured[3]


def test_each_operating_point_of_the_sweeps_figure_has_its_systems_colour():
    """Every system's operating points were drawn in black, so the figure's four stars (and
    four crosses, two squares) could not be told apart; each now takes the colour of its
    system's curve (the full networks' squares, that of fp32 and int8)."""
    from matplotlib.colors import to_hex

    from studies._common import figure_style

    policies = [p.value for p in early_exit.ExitPolicy]
    sweeps = pd.DataFrame([{"system": s, "policy": p, "split": "test", "threshold": t,
                            "accuracy": 0.8 + 0.01 * i + 0.1 * t, "mean_macs": t,
                            "macs_fraction": t}
                           for i, s in enumerate(early_exit.SYSTEMS) for p in policies
                           for t in (0.5, 1.0)])
    points = pd.DataFrame(
        [{"system": f"{s}_early_exit", "policy": p + extra, "accuracy": 0.85 + 0.01 * i,
          "macs_fraction": 0.6 + 0.05 * i}
         for i, s in enumerate(early_exit.SYSTEMS) for p in policies
         for extra in ("", " per exit")]
        + [{"system": f"{s}_full", "policy": "none", "accuracy": 0.9, "macs_fraction": 1.0}
           for s in (early_exit.FP32, early_exit.INT8)])
    plt = figure_style()
    fig = early_exit.figure_sweeps(plt, sweeps, points)
    try:
        for ax, policy in zip(fig.axes, policies):
            curves = {line.get_label(): to_hex(line.get_color()) for line in ax.lines
                      if line.get_linestyle() == "-"}
            assert set(curves) == set(early_exit.SYSTEMS)
            marks = [line for line in ax.lines if line.get_linestyle() in ("None", "")]
            mine = points[points.policy.isin([policy, f"{policy} per exit", "none"])]
            assert len(marks) == len(mine)
            for line, system in zip(marks, mine.system):
                owner = system.removesuffix("_early_exit").removesuffix("_full")
                assert to_hex(line.get_color()) == curves[owner], system
    finally:
        plt.close(fig)


def test_an_unknown_exit_point_is_refused_before_the_baseline(fashion_root, tmp_path,
                                                              monkeypatch, capsys):
    """--exit-points naming no block was refused only once the backbone was loaded: with no
    cached baseline, after training ResNet50 (most of an hour) into the cache."""
    def load_backbone(args, data_root):
        raise AssertionError("the baseline was loaded (trained, were it missing) first")

    monkeypatch.setattr(early_exit, "load_backbone", load_backbone)
    out = tmp_path / "ee"
    assert early_exit.main(["--exit-points", "layer9", "--data-root", str(fashion_root),
                            "--out", str(out)]) == 2
    assert "--exit-points: exit point 'layer9' is not a block" in capsys.readouterr().err
    assert not out.exists()
