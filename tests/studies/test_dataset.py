"""The dataset-quantization study: bit-exact equivalence, pixel levels, storage, smoke run."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from qerror import QParams, RoundingMode, calibrate, quantize
from qerror import data as qdata
from studies import dataset
from studies._common import sha256_file

DETERMINISTIC = [m for m in RoundingMode if not m.is_random]


@pytest.fixture
def idx_root(fashion_idx):
    """Synthetic Fashion-MNIST IDX files; nothing else is found."""
    return fashion_idx(train=300, test=200)


def small_images(seed: int, n: int) -> torch.Tensor:
    """Model inputs (n, 1, 32, 32) made by the data path from random uint8 pixels."""
    rng = np.random.default_rng(seed)
    return qdata.to_tensor(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))


def test_offline_codes_of_images_are_a_lookup_of_the_256_pixel_levels():
    """Pixels are normalized one by one, so quantizing an image is looking up its pixels'
    codes; the study's pixel-level tables therefore describe every input exactly."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
    x = qdata.to_tensor(pixels)
    padded = np.pad(pixels, ((0, 0), (2, 2), (2, 2)))  # to_tensor pads with pixel level 0
    levels = dataset.pixel_level_values()
    for bits in (8, 4):
        qp = calibrate(x, dataset.INT8.replace(bits=bits))
        for mode in DETERMINISTIC:
            spec = dataset.INT8.replace(bits=bits, rounding=mode)
            lut = quantize(levels, spec, qp.scale, qp.zero_point).numpy()
            codes = quantize(x, spec, qp.scale, qp.zero_point).numpy()[:, 0]
            np.testing.assert_array_equal(codes, lut[padded])


def test_calibrated_int8_quantizer_keeps_pixel_levels_and_truncation_merges_two():
    """With a calibration range from pixel 0 to 255 the scale is one pixel step, and the
    integer zero point leaves the levels a fraction f = round(255·MEAN) − 255·MEAN of a step
    above the code grid. For 0 < f < 1/2 round-to-nearest and floor give each level k the
    code k + qmin (lossless, error −f); truncation acts on u = k + qmin + f, rounds the
    negative u up and merges the two levels around u = 0: k = −qmin − 1 and k = −qmin."""
    f = round(255 * qdata.MEAN) - 255 * qdata.MEAN
    assert 0 < f < 0.5  # the premise of the expectations below
    pixels = np.zeros((2, 28, 28), dtype=np.uint8)
    pixels[1] = 255
    qp = calibrate(qdata.to_tensor(pixels), dataset.INT8)
    levels = dataset.pixel_levels({8: qp}, pixels)
    summary = dataset.pixel_summary(levels, {8: qp}).set_index("mode")
    # The arithmetic is float32: the error is −f to within a few float32 ulps of 255.
    tol = 8 * 255 * np.finfo(np.float32).eps
    for mode in ("nearest_even", "nearest_away", "floor"):
        row = summary.loc[mode]
        assert row.lossless and row.frac_test_pixels_off_grid == 0 and row.ties == 0
        assert abs(row.min_error_lsb + f) < tol and abs(row.max_error_lsb + f) < tol
    trunc = levels[levels["mode"] == "toward_zero"].set_index("pixel").code
    qmin = dataset.INT8.qmin
    merged = trunc[trunc.duplicated(keep=False)]
    assert list(merged.index) == [-qmin - 1, -qmin]
    assert summary.loc["toward_zero"].merged_levels == 1


def test_equivalence_counts_the_inputs_each_network_receives():
    """The README states from equivalence.csv in how many input elements the two networks
    received different values, but no test looked at those counts: the in-model network's
    hook recording its float input instead of the quantizer's output, or the float
    comparison given the quantized input twice, left every test passing. The counts are
    checked against inputs made here: the quantizer's output, the dequantized offline codes
    and the float input."""
    from qerror import dequantize, fake_quantize, quantize_offline

    x = small_images(6, 24)
    qp = calibrate(x[:8], dataset.INT8)
    net = dataset.smoke_net(seed=0)
    float_logits = dataset.predict(net, x, 8, "float", progress=False)
    frame, paths = dataset.equivalence(net, x, qp, float_logits, 8, progress=False)
    got = frame.set_index(["comparison", "metric"]).value
    quantized = fake_quantize(x, dataset.INT8, qp.scale, qp.zero_point)
    stored = dequantize(quantize_offline(x, dataset.INT8, qp), qp.scale, qp.zero_point)
    assert torch.equal(paths["input"], stored)
    own = got["quantizer_in_model_vs_offline_codes"]
    assert own["input_elements"] == x.numel()
    assert own["differing_input_elements"] == int((quantized != stored).sum()) == 0
    changed = int((quantized != x).sum())
    assert 0 < changed  # quantization moves the float input
    versus_float = got["quantizer_in_model_vs_float_input"]
    assert versus_float["input_elements"] == x.numel()
    assert versus_float["differing_input_elements"] == changed


def test_logit_cache_runs_only_new_inputs():
    net = dataset.smoke_net(seed=0)
    cache = dataset.LogitCache(net, batch_size=8, progress=False)
    x = small_images(5, 20)
    first, ran = cache(x, "first")
    assert ran == 20
    again, ran = cache(x.clone(), "again")
    assert ran == 0 and torch.equal(again, first)
    y = x.clone()
    y[7, 0, 5, 5] += 1.0
    changed, ran = cache(y, "one changed")
    alone = dataset.predict(net, y[7:8], 8, "alone", progress=False)
    assert ran == 1 and torch.equal(changed[7], alone[0])
    assert torch.equal(changed[:7], first[:7]) and torch.equal(changed[8:], first[8:])


def test_storage_bytes_are_shape_times_element_size():
    frame = dataset.storage_table()
    shapes = {"28x28 pixels": (28, 28), "1x32x32 model input": (1, 32, 32),
              "3x224x224 model input": (3, 224, 224)}
    for r in frame.itertuples():
        elements = math.prod(shapes[r.layout])
        size = 0.5 if r.format == "int4 packed" else np.dtype(r.format).itemsize
        assert r.bytes == math.ceil(r.images * elements * size)
        assert r.ratio_to_float32 == r.bytes / (r.images * elements * 4)
    by = frame.set_index(["dataset", "split", "layout", "format"]).bytes
    assert by["ImageNet", "val", "3x224x224 model input", "float32"] == 50_000 * 3 * 224 * 224 * 4
    assert by["ImageNet", "train", "3x224x224 model input", "uint8"] == 1_281_167 * 3 * 224 * 224
    assert by["Fashion-MNIST", "train+test", "28x28 pixels", "uint8"] == 70_000 * 28 * 28
    assert by["Fashion-MNIST", "test", "1x32x32 model input", "float16"] == 10_000 * 1024 * 2


def test_smoke_run_end_to_end(idx_root, tmp_path, capsys):
    out = tmp_path / "dataset"
    argv = ["--smoke", "--data-root", str(idx_root), "--out", str(out), "--no-progress",
            "--scale-errors", "0.02", "0.02"]  # a value named twice is one variant
    assert dataset.main(argv) == 0
    # --no-progress: no bar at all (the throughput timing's three were drawn regardless)
    assert "%|" not in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["outputs"]) == files
    for name, digest in manifest["outputs"].items():
        assert sha256_file(out / name) == digest
    for stem in ("accuracy_by_mode", "pixel_error", "storage", "offline_variants"):
        assert {f"{stem}.pdf", f"{stem}.png"} <= files
    for table in ("equivalence", "offline_variants", "accuracy", "mcnemar", "pixel_summary",
                  "storage"):
        assert "\\toprule" in (out / f"{table}.tex").read_text()
    assert "\\newcommand{\\datasetEquivDifferingLogits}{0}" in (out / "macros.tex").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bit_exact"] and summary["equivalence"]["max_abs_logit_diff"] == 0

    acc = pd.read_csv(out / "accuracy.csv")
    modes, bits = dataset.DEFAULT_MODES, dataset.DEFAULT_BITS
    assert len(acc) == 1 + len(modes) * len(bits) and (acc.n == 200).all()
    assert ((acc.ci_low <= acc.accuracy) & (acc.accuracy <= acc.ci_high)).all()
    # Without ties round-half-away gives round-half-even's codes, so no image is run again.
    pixels = pd.read_csv(out / "pixel_summary.csv")
    no_ties = set(pixels.loc[pixels.ties == 0, "bits"])
    assert no_ties == set(bits)
    away = acc[acc["mode"] == "nearest_away"]
    assert (away.images_evaluated == 0).all()
    mcnemar = pd.read_csv(out / "mcnemar.csv")
    assert len(mcnemar) == len(bits) * (2 * len(modes) - 1)

    variants = pd.read_csv(out / "offline_variants.csv").set_index("variant")
    assert variants.index.is_unique
    own = variants.loc["model"]  # requantizing with the model's own parameters changes nothing
    assert own.frac_codes_changed == 0 and own.max_abs_logit_diff == 0 and own.images_evaluated == 0
    assert variants.loc["scale_+2pct", "frac_codes_changed"] > 0
    # the model's own row is a check, outside the Holm family of the others
    from qerror.stats import holm

    family = variants[variants.in_family]
    assert np.isnan(own.mcnemar_p_holm) and not own.differs and not own.in_family
    np.testing.assert_array_equal(family.mcnemar_p_holm, holm(family.mcnemar_p.to_numpy()))

    storage = pd.read_csv(out / "storage.csv")
    held = storage.dropna(subset=["measured_bytes_per_image"])
    assert len(held) >= 5 and (held.measured_bytes_per_image == held.bytes_per_image).all()


@pytest.mark.parametrize("argv, message", [
    (["--modes", "nearest_even", "round_up"], "rounding mode 'round_up' is not one of"),
    (["--bits", "9"], "must be from 2 to 8, got 9"),
    (["--bits", "1"], "must be from 2 to 8, got 1 (offline codes are stored one per int8"),
    (["--bits", "eight"], "--bits: expected an integer, got 'eight'"),
    (["--scale-errors", "0"], "--scale-errors must be non-zero"),
    (["--no-train-if-missing"],  # the smoke CNN is never trained: it was ignored
     "--train-if-missing/--no-train-if-missing would change nothing"),
    (["--train-if-missing", "--checkpoint", "model.pt"],
     "this run's network is --checkpoint's"),
    (["--scale-errors", "0.02", "0.0200000001"],  # were two variants named scale_+2pct
     "--scale-errors 0.02 and 0.0200000001 are the same to six significant digits"),
])
def test_bad_arguments_are_refused_before_any_output(argv, message, tmp_path, capsys):
    out = tmp_path / "dataset"
    with pytest.raises(SystemExit) as exit_info:
        dataset.main(["--smoke", "--out", str(out), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_data_is_reported_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(qdata.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(qdata, "DEBIAN_DIR", tmp_path / "no-debian")
    out = tmp_path / "dataset"
    assert dataset.main(["--smoke", "--data-root", str(tmp_path / "none"),
                         "--out", str(out)]) == 2
    assert "Fashion-MNIST was not found" in capsys.readouterr().err
    assert not out.exists()


def test_exact_ties_counts_every_half_way_value():
    """Levels on quarter steps of a scale of 1: every other one is half-way between codes,
    including those where round-half-to-even and round-half-away agree (±3.5 round to ±4
    both ways), which a comparison of the two modes misses."""
    levels = np.arange(-80, 80) * 0.25  # -20 .. 19.75: 160 values, 40 half-integers
    assert dataset.exact_ties(levels, QParams(1.0, 0)) == 40
    # with a zero point of 1 (still an integer) the same values are ties
    assert dataset.exact_ties(levels, QParams(1.0, 1)) == 40
    # a scale of 0.5 makes the quarter steps halves of a step: the odd quarters are ties
    assert dataset.exact_ties(levels, QParams(0.5, 0)) == 80


def test_scale_errors_a_leading_zero_apart_get_macros_of_their_own():
    """0.5 % and 0.05 % were both spelled ...ZeroPointFive...: the second variant's numbers
    overwrote the first's macros without a word."""
    base = QParams(0.01, -3)
    variants = dataset.offline_params(base, small_images(8, 4), [0.005, 0.0005])[-2:]
    frame = pd.DataFrame({"variant": [v.name for v in variants],
                          "frac_codes_changed": [0.30, 0.01], "prediction_changes": [40, 1]})
    equiv = pd.DataFrame({"comparison": "quantizer_in_model_vs_offline_codes",
                          "metric": ["images", "logit_elements", "differing_logit_elements",
                                     "max_abs_logit_diff", "differing_input_elements"],
                          "value": [1, 10, 0, 0.0, 0]})
    none = pd.DataFrame(columns=["config", "mode", "bits", "versus", "p_holm", "accuracy",
                                 "ci_low", "ci_high", "input_bias_lsb", "distinct_codes",
                                 "bias_lsb"])
    macros = dataset._macros(equiv, none, frame, none, none, dataset.storage_table())
    changed = {k: v for k, v in macros.items() if k.startswith("CodesChanged")}
    assert sorted(changed.values()) == ["1.00", "30.00"]


def test_configurations_with_the_same_input_are_one_test_in_the_holm_family():
    """Round-half-away gives round-half-to-even's codes where no value is a tie: its tests
    repeated the same comparison on the same data, and its test against round-half-to-even
    compared two identical inputs, yet all counted in Holm's family, inflating every
    adjusted p (on the baseline 0.42 for truncation against rounding at 8 bits, 0.24 over
    the distinct tests)."""
    from qerror.stats import holm

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (600, 28, 28), dtype=np.uint8)
    x = qdata.to_tensor(pixels)
    net = dataset.smoke_net(seed=0)
    cache = dataset.LogitCache(net, batch_size=256, progress=False)
    float_logits, ran = cache(x, "float")
    labels = float_logits.argmax(1)  # right on float input: quantized inputs lose images
    modes = [RoundingMode.NEAREST_EVEN, RoundingMode.NEAREST_AWAY, RoundingMode.TOWARD_ZERO]
    acc, mc, qparams = dataset.offline_rounding(cache, x, labels, x[:100], modes, [3], float_logits,
                                                ran, seed=0)
    # the premise: no tie, so half-away's input is half-even's
    assert dataset.exact_ties(dataset.pixel_level_values().numpy(), qparams[3]) == 0
    assert acc.set_index("config").images_evaluated["nearest_away@3"] == 0
    mc = mc.set_index(["config", "versus"])
    distinct = [("nearest_even@3", "float32"), ("toward_zero@3", "float32"),
                ("toward_zero@3", "nearest_even@3")]
    expected = holm(mc.loc[distinct, "p_value"].to_numpy())
    assert expected.min() < dataset.ALPHA < 1  # the family's size shows in the adjusted p
    np.testing.assert_array_equal(mc.loc[distinct, "p_holm"].to_numpy(), expected)
    assert mc.loc[("nearest_away@3", "float32"), "p_holm"] == expected[0]
    assert mc.loc[("nearest_away@3", "float32"), "same_test_as"] == "nearest_even@3 vs float32"
    check = mc.loc[("nearest_away@3", "nearest_even@3")]
    assert np.isnan(check.p_holm) and not check.differs and not check.in_family
    assert mc.in_family.sum() == 3


def test_variants_with_the_model_codes_are_checks_outside_the_holm_family():
    """Another subset whose min-max is the calibration split's requantizes to the model's own
    codes (on the baseline, the other subset's min-max and 99.9th percentile do): its
    McNemar test compared two identical inputs, yet counted in Holm's family."""
    from qerror.stats import holm

    rng = np.random.default_rng(2)
    x = qdata.to_tensor(rng.integers(0, 256, (600, 28, 28), dtype=np.uint8))
    calib = x[:100]
    model_qp = calibrate(calib, dataset.INT8)
    net = dataset.smoke_net(seed=0)
    cache = dataset.LogitCache(net, batch_size=256, progress=False)
    with torch.inference_mode():
        single_input = dataset.InputQuantizer(dataset.INT8, model_qp)(x)
    single, _ = cache(single_input, "single")
    labels = single.argmax(1)  # right on every image once quantized: other codes lose some
    # "another subset" that is the calibration split: its min-max is the model's
    variants = dataset.offline_params(model_qp, calib, [-0.6, 3.0, -0.60001])
    frame = dataset.double_quantization(cache, x, labels, model_qp, variants, single)
    frame = frame.set_index("variant")
    assert frame.frac_codes_changed["other_minmax"] == 0  # the premise
    # the variants whose codes differ from the model's, each once (-60.001 % gives -60 %'s)
    assert frame.frac_codes_changed["scale_-60.001pct"] == frame.frac_codes_changed["scale_-60pct"]
    tested = ["other_p99", "scale_-60pct", "scale_+300pct"]
    assert (frame.drop(index=tested).frac_codes_changed[:-1] == 0).all()
    expected = holm(frame.mcnemar_p[tested].to_numpy())
    assert expected.min() < dataset.ALPHA < 1  # the family's size shows in the adjusted p
    np.testing.assert_array_equal(frame.mcnemar_p_holm[tested].to_numpy(), expected)
    assert frame.mcnemar_p_holm["scale_-60.001pct"] == frame.mcnemar_p_holm["scale_-60pct"]
    assert frame.same_test_as["scale_-60.001pct"] == "scale_-60pct"
    for name in ("model", "other_minmax"):
        assert not frame.in_family[name] and np.isnan(frame.mcnemar_p_holm[name])
    assert list(frame.index[frame.in_family]) == tested
