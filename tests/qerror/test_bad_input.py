"""The API's bad-input table: each wrong call raises one exception of the right type whose
message names the problem (and, where there is one, the fix); none is an AttributeError or
another accident of the implementation."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from scipy import stats

from qerror import (
    HistogramBins,
    QuantSpec,
    RangePolicy,
    RoundingMode,
    apply_rounding,
    bias_test,
    calibrate,
    data,
    dequantize,
    error_moments,
    fake_quantize,
    mcnemar_from_counts,
    quantize,
    wilson_ci,
)
from qerror.compress.size import storage_bytes
from qerror.compress.sparse import GradualSchedule, zero_count
from qerror.compress.survivors import quantize_survivors
from qerror.compress.tiny import TinyCNN
from qerror.compress.weightless import LUTLayer, WiSARD, fit_dwn, seeded_mapping
from qerror.nn import QuantConfig, difference_sums, measure
from qerror.nn.adaround import AdaRoundSettings
from qerror.nn.early_exit import (
    EarlyExitResNet,
    ExitCosts,
    ExitHead,
    ExitRule,
    SelectionProcedure,
    block_mac_fractions,
    confidence_ece,
    cross_validate_selection,
    exit_costs,
    exit_result_from_logits,
    exits_per_class,
    refine_thresholds,
    sdn_exit_points,
)
from qerror.nn.geometry import live_taps
from qerror.nn.growth import layer_block_bootstrap
from qerror.nn.input_quant import quantize_offline
from qerror.nn.int8 import crosscheck_model
from qerror.nn.models import (
    CheckpointNotFoundError,
    fashion_resnet,
    fashion_small_cnn,
    load_checkpoint,
    plain_chain,
    time_training_step,
)
from qerror.nn.parallel import shard
from qerror.nn.propagate import calibrate_activations, default_pair_batch, quantize_weights
from qerror.nn.pt2e import ZeroPaddedConv2d, quantize_pt2e
from qerror.nn.seeds import image_outcomes, network_statements
from qerror.nn.training import TrainConfig, fit, resolve_device, tensor_batches
from qerror.nn.updown import updown_experiment
from qerror.nonuniform import lloyd_max
from qerror.rounding import stochastic_key
from qerror.stats import bootstrap_ci, mse_ratio_ci, tail_share_normal

SPEC = QuantSpec()
X = np.array([0.5, 1.0], np.float32)

# (case id, call, exception type, regular expression its message must match)
CASES = [
    ("quantize-a-list", lambda: quantize([1.0, 2.0], SPEC, 0.1), TypeError,
     r"x must be a numpy\.ndarray or torch\.Tensor, got list; convert with numpy\.asarray"),
    ("fake-quantize-a-tuple", lambda: fake_quantize((1.0,), SPEC, 0.1), TypeError,
     r"got tuple"),
    ("calibrate-a-list", lambda: calibrate([1.0, 2.0], SPEC), TypeError, r"got list"),
    ("dequantize-a-list", lambda: dequantize([1, 2], 0.1), TypeError, r"q must be .* got list"),
    ("integer-array", lambda: quantize(np.array([1, 2]), SPEC, 0.1), TypeError,
     r"floating-point array .* got dtype int64; convert with x\.astype"),
    ("integer-tensor", lambda: quantize(torch.tensor([1, 2]), SPEC, 0.1), TypeError,
     r"floating-point tensor .* convert with x\.float\(\)"),
    ("nan-in-data", lambda: quantize(np.array([1.0, np.nan], np.float32), SPEC, 0.1),
     ValueError, r"1 non-finite value\(s\) \(first nan at index \(1,\)\)"),
    ("empty-data", lambda: quantize(np.array([], np.float32), SPEC, 0.1), ValueError,
     r"x is empty"),
    ("zero-scale", lambda: quantize(X, SPEC, 0.0), ValueError,
     r"scale must be positive and finite"),
    ("nan-scale", lambda: quantize(X, SPEC, float("nan")), ValueError,
     r"scale must be positive and finite"),
    ("bits-1", lambda: QuantSpec(bits=1), ValueError, r"bits must be an int >= 2, got 1"),
    ("bits-17", lambda: QuantSpec(bits=17), ValueError, r"bits must be between 2 and 16, got 17"),
    ("bits-a-float", lambda: QuantSpec(bits=8.0), TypeError, r"bits must be an int"),
    ("spec-a-string", lambda: quantize(X, "int8", 0.1), TypeError, r"spec must be a QuantSpec"),
    ("stochastic-without-generator",
     lambda: fake_quantize(X, QuantSpec(rounding=RoundingMode.STOCHASTIC), 0.1), ValueError,
     r"STOCHASTIC rounding needs generator="),
    ("distribution-missing", lambda: error_moments(None, SPEC, 0.1), TypeError,
     r"dist must be a frozen scipy\.stats continuous distribution"),
    ("wilson-no-trials", lambda: wilson_ci(5, 0), ValueError, r"n must be at least 1"),
    # a count is checked in one place (qerror._checks.check_count): stats and compress said
    # TypeError 'must be an integer' and ValueError 'must be an int >= 0' for the same 2.5
    ("count-a-float-stats", lambda: wilson_ci(2.5, 10), TypeError,
     r"^successes must be an int >= 0, got 2\.5 \(float\): .* round\(\)"),
    ("count-a-float-compress", lambda: storage_bytes("float32", 2.5), TypeError,
     r"^elements must be an int >= 0, got 2\.5 \(float\): .* round\(\)"),
    ("count-a-bool-stats", lambda: mcnemar_from_counts(True, 0, 5), TypeError,
     r"^only_a must be an int >= 0, got True \(bool\)"),
    ("count-a-bool-compress", lambda: storage_bytes("float32", True), TypeError,
     r"^elements must be an int >= 0, got True \(bool\)"),
    ("count-negative-stats", lambda: wilson_ci(-1, 10), ValueError,
     r"^successes must be an int >= 0, got -1$"),
    ("count-negative-compress", lambda: storage_bytes("float32", -1), ValueError,
     r"^elements must be an int >= 0, got -1$"),
    ("bias-test-one-value", lambda: bias_test([1.0]), ValueError, r"need at least 2"),
    ("checkpoint-missing", lambda: load_checkpoint("/nonexistent/model.pt"),
     CheckpointNotFoundError, r"no checkpoint at /nonexistent/model\.pt"),
    ("data-root-missing", lambda: data.fashion_mnist_splits("/nonexistent"),
     data.DataNotFoundError, r"/nonexistent does not exist"),
]


@pytest.mark.parametrize("call, kind, pattern", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_api_input_raises_a_clear_error(call, kind, pattern):
    with pytest.raises(kind) as info:
        call()
    assert re.search(pattern, str(info.value)), str(info.value)


def test_a_truncated_idx_file_is_named(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data.write_idx(path, np.zeros(100, np.uint8))
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(data.DataError, match=re.escape(str(path))):
        data.read_idx(path)


# Every count of the API goes through qerror._checks.check_count: a float (even an integral
# one) or a bool is a TypeError, an integer below the count's least a ValueError, each
# naming the argument. Before, these said ValueError for 3.0 and True (or truncated 3.0, or
# took True as 1) in as many wordings as there were checks.
def _model():
    return plain_chain(depth=2, width=2, num_classes=3)


def _images():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0]))]


def _exit_inputs():
    """Two exits' logits of 6 samples, their labels, costs and the reference's correctness."""
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    costs = ExitCosts(("layer1", "fc"), (8, 95), (2, 1), (10, 98), 95)
    return logits, labels, costs, logits[-1].argmax(1) == labels


def _refine(v):
    logits, labels, costs, ref = _exit_inputs()
    return refine_thresholds(logits, labels, ExitRule("entropy", (0.5,)), [0.5], costs, ref,
                             0.0, max_rounds=v)


def _cross_validate(margin=0.0, **kw):
    logits, labels, costs, ref = _exit_inputs()
    return cross_validate_selection(logits, labels, [SelectionProcedure("entropy", False, 0.0)],
                                    [0.5], costs, ref, margin, calibration=None, **kw)


def _exits_per_class(v):
    logits, labels, _, _ = _exit_inputs()
    return exits_per_class(exit_result_from_logits(logits, ExitRule("entropy", (0.5,))),
                           labels, v)


def _early_exit_resnet(**kw):
    return EarlyExitResNet(fashion_resnet("resnet18"), ("layer2",), **kw)


def _measure(**kw):
    return measure(_model(), _images(), QuantConfig.make(8), **kw)


def _statements(how, **kw):
    """network_statements or image_outcomes of the two-layer chain, one width, one mode."""
    (x, y), = _images()
    return how(_model(), x, x, y, bits=(8,), modes=("nearest_even",), **kw)


def _crosscheck(v):
    x = [torch.zeros(2, 4)]
    return crosscheck_model(torch.nn.Sequential(torch.nn.Linear(4, 3)).eval(), x, x, seed=v)


def _offline(v):
    x = torch.linspace(0.0, 1.0, 4)
    return quantize_offline(x, _STOCHASTIC_U8, calibrate(x, _STOCHASTIC_U8), seed=v)


def _fit(**kw):
    (x, y), = _images()
    return fit(_model(), tensor_batches(x, y), kw.pop("n_train", 4),
               TrainConfig(epochs=1, batch_size=2, lr=0.1), progress=False, **kw)


_STOCHASTIC = QuantSpec(rounding=RoundingMode.STOCHASTIC)
_STOCHASTIC_U8 = QuantSpec(signed=False, rounding=RoundingMode.STOCHASTIC)
_ACTIVATIONS = QuantConfig.make(8).activation
_DEPTH = np.arange(1.0, 13.0)
_PIXELS = np.zeros((2, 28, 28), np.uint8)
_SCHEDULE = dict(final=0.5, updates=2)
_CONF, _RIGHT = np.array([0.6, 0.9]), np.array([True, False])
_PT2E_NET = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1))
# (case id, the argument as the message names it, its least, a call with the count v, an
# integral float that int() would have taken)
COUNTS = [
    ("quantspec-bits", "bits", 2, lambda v: QuantSpec(bits=v), 8.0),
    ("quantize-offset", "offset (a flat element index)", 0,
     lambda v: fake_quantize(X, _STOCHASTIC, 0.1, generator=1, offset=v), 2.0),
    ("histogram-bins-count", "count", 1, lambda v: HistogramBins(count=v), 192.0),
    ("range-policy-mse-grid", "mse_grid", 2, lambda v: RangePolicy(mse_grid=v), 10.0),
    ("lloyd-max-levels", "levels", 2, lambda v: lloyd_max(stats.norm(), v), 4.0),
    ("lloyd-max-max-iter", "max_iter", 1,
     lambda v: lloyd_max(stats.norm(), 4, max_iter=v), 10.0),
    ("splits-val", "val", 0, lambda v: data.fashion_mnist_splits("/nonexistent", val=v),
     100.0),
    ("splits-calib", "calib", 0,
     lambda v: data.fashion_mnist_splits("/nonexistent", calib=v), 100.0),
    ("to-tensor-size", "size", 28, lambda v: data.to_tensor(_PIXELS, v), 32.0),
    ("to-small-tensor-size", "size", 1, lambda v: data.to_small_tensor(_PIXELS, v), 8.0),
    ("imagenet-resize", "resize", 1, lambda v: data.imagenet_folder("/nonexistent", resize=v,
                                                                   crop=1), 256.0),
    ("imagenet-crop", "crop", 1, lambda v: data.imagenet_folder("/nonexistent", crop=v),
     224.0),
    ("gradual-updates", "GradualSchedule.updates", 1,
     lambda v: GradualSchedule(**_SCHEDULE | {"updates": v}), 2.0),
    ("gradual-interval", "GradualSchedule.interval", 1,
     lambda v: GradualSchedule(**_SCHEDULE, interval=v), 2.0),
    ("gradual-start", "GradualSchedule.start", 0,
     lambda v: GradualSchedule(**_SCHEDULE, start=v), 2.0),
    ("seeded-mapping-inputs", "inputs", 1, lambda v: seeded_mapping(v, 4, 0), 4.0),
    ("seeded-mapping-slots", "slots", 0, lambda v: seeded_mapping(4, v, 0), 4.0),
    ("train-config-epochs", "TrainConfig.epochs", 1,
     lambda v: TrainConfig(epochs=v, batch_size=2, lr=0.1), 1.0),
    ("train-config-batch-size", "TrainConfig.batch_size", 1,
     lambda v: TrainConfig(epochs=1, batch_size=v, lr=0.1), 2.0),
    ("fit-n-train", "n_train", 0, lambda v: _fit(n_train=v), 4.0),
    ("fit-val-size", "val_size", 0, lambda v: _fit(val_size=v), 4.0),
    ("fit-checkpoint-every", "checkpoint_every", 1, lambda v: _fit(checkpoint_every=v),
     2.0),
    ("fit-stop-after-steps", "stop_after_steps", 1, lambda v: _fit(stop_after_steps=v),
     2.0),
    ("adaround-bits", "bits", 2, lambda v: AdaRoundSettings(bits=v), 4.0),
    ("adaround-iterations", "iterations", 0,
     lambda v: AdaRoundSettings(bits=4, iterations=v), 10.0),
    ("adaround-batch", "batch", 1, lambda v: AdaRoundSettings(bits=4, batch=v), 8.0),
    ("adaround-images", "images", 1, lambda v: AdaRoundSettings(bits=4, images=v), 8.0),
    ("updown-bits", "bits", 2, lambda v: updown_experiment(_model(), "0", _images(), v),
     4.0),
    ("updown-roundings", "roundings", 1,
     lambda v: updown_experiment(_model(), "0", _images(), roundings=v), 3.0),
    ("bootstrap-resamples", "resamples", 100,
     lambda v: layer_block_bootstrap(_DEPTH, _DEPTH, resamples=v), 200.0),
    ("bootstrap-block", "block (layers per block)", 1,
     lambda v: layer_block_bootstrap(_DEPTH, _DEPTH, resamples=100, block=v), 2.0),
    ("fashion-resnet-num-classes", "num_classes", 1,
     lambda v: fashion_resnet("resnet18", num_classes=v), 10.0),
    ("small-cnn-width", "width", 1, lambda v: fashion_small_cnn(v), 4.0),
    ("small-cnn-num-classes", "num_classes", 1, lambda v: fashion_small_cnn(4, v), 10.0),
    ("plain-chain-depth", "depth", 1, lambda v: plain_chain(v), 2.0),
    ("plain-chain-width", "width", 1, lambda v: plain_chain(2, v), 2.0),
    ("plain-chain-num-classes", "num_classes", 1, lambda v: plain_chain(2, 2, v), 3.0),
    ("plain-chain-in-channels", "in_channels", 1,
     lambda v: plain_chain(2, 2, in_channels=v), 1.0),
    ("time-training-step-steps", "steps", 1, lambda v: time_training_step(steps=v), 1.0),
    ("time-training-step-warmup", "warmup", 0, lambda v: time_training_step(warmup=v),
     1.0),
    ("time-training-step-batch-size", "batch_size", 1,
     lambda v: time_training_step(batch_size=v), 2.0),
    ("exit-head-width", "width", 1, lambda v: ExitHead(4, 3, width=v), 8.0),
    ("exit-head-pool", "pool", 1, lambda v: ExitHead(4, 3, pool=v), 2.0),
    ("early-exit-input-shape", "each size of input_shape", 1,
     lambda v: _early_exit_resnet(input_shape=(1, v, 32)), 32.0),
    ("confidence-ece-n-bins", "n_bins", 1, lambda v: confidence_ece(_CONF, _RIGHT, v), 15.0),
    ("refine-max-rounds", "max_rounds", 1, _refine, 5.0),
    ("cross-validate-folds", "folds", 2, lambda v: _cross_validate(folds=v), 3.0),
    ("cross-validate-plan-n",
     "plan_n (the images of the split the rule will be reported on)", 1,
     # a positive margin: with alpha, margin 0 is refused first (e43fb5c)
     lambda v: _cross_validate(0.005, alpha=0.05, plan_n=v), 100.0),
    ("exits-per-class-num-classes", "num_classes", 1, _exits_per_class, 3.0),
    ("live-taps-size", "size", 1, lambda v: live_taps(v, 3, 1, 1), 4.0),
    ("live-taps-stride", "stride", 1, lambda v: live_taps(4, 3, v, 1), 1.0),
    ("live-taps-padding", "padding", 0, lambda v: live_taps(4, 3, 1, (v, 1)), 1.0),
    ("pair-batch-images", "images", 0, lambda v: default_pair_batch(v), 64.0),
    ("pair-batch-arms", "arms (a number of configurations)", 1,
     lambda v: default_pair_batch(64, v), 2.0),
    ("pair-batch-min-chunk", "min_chunk (a number of images)", 1,
     lambda v: default_pair_batch(64, 1, v), 32.0),
    ("measure-local-samples", "local_samples (a number of images)", 0,
     lambda v: _measure(local_samples=v), 4.0),
    ("measure-pair-batch", "pair_batch (a number of images)", 1,
     lambda v: _measure(pair_batch=v), 4.0),
    ("measure-image-means", "image_means (a number of images)", 0,
     lambda v: _measure(image_means=v), 4.0),
    ("measure-first-batch", "first_batch (a batch index)", 0,
     lambda v: _measure(first_batch=v), 0.0),
    ("difference-sums-chunks", "chunks", 1,
     lambda v: difference_sums(torch.zeros(2, 2), torch.zeros(2, 2), chunks=v), 1.0),
    ("zero-padded-conv-extra", "extra", 1,
     lambda v: ZeroPaddedConv2d(torch.nn.Conv2d(1, 2, 3), v), 1.0),
    ("pt2e-warmup-sizes", "each of warmup_sizes (a batch size)", 1,
     lambda v: quantize_pt2e(_PT2E_NET, [torch.zeros(2, 2, 4, 4)], warmup_sizes=(v,)), 2.0),
    ("pt2e-max-batch", "max_batch", 2,
     lambda v: quantize_pt2e(_PT2E_NET, [torch.zeros(2, 2, 4, 4)], warmup_sizes=(1,),
                             max_batch=v), 64.0),
    ("calibrate-activations-sample-per-batch", "sample_per_batch", 1,
     lambda v: calibrate_activations(_model(), _images(), _ACTIVATIONS, sample_per_batch=v),
     4096.0),
    ("network-statements-batch", "batch (images per paired batch)", 1,
     lambda v: _statements(network_statements, batch=v), 4.0),
    ("image-outcomes-batch", "batch (images per paired batch)", 1,
     lambda v: _statements(image_outcomes, batch=v), 4.0),
    ("shard-n", "n", 0, lambda v: shard(v, 0, 2), 5.0),
    ("shard-rank", "rank", 0, lambda v: shard(5, v, 2), 1.0),
    ("shard-size", "size", 1, lambda v: shard(5, 0, v), 2.0),
    ("exit-costs-input-shape", "each size of input_shape", 1,
     lambda v: exit_costs(_early_exit_resnet(), (1, v, 32)), 32.0),
    ("block-mac-fractions-input-shape", "each size of input_shape", 1,
     lambda v: block_mac_fractions(fashion_resnet("resnet18"), (1, 32, v)), 32.0),
    ("sdn-exit-points-input-shape", "each size of input_shape", 1,
     lambda v: sdn_exit_points(fashion_resnet("resnet18"), input_shape=(v, 32, 32)), 1.0),
    ("tail-share-normal-draws", "draws", 1, lambda v: tail_share_normal(20, 2, v), 3.0),
    ("zero-count-n", "n", 0, lambda v: zero_count(0.5, v), 4.0),
    ("resolve-device-local-rank", "local_rank", 0, lambda v: resolve_device("cpu", v), 0.0),
    ("load-checkpoint-expected-num-classes", "expected_num_classes", 1,
     lambda v: load_checkpoint("/nonexistent/baseline.pt", expected_num_classes=v), 10.0),
]


@pytest.mark.parametrize("wrong", ["float", "bool", "too-small"])
@pytest.mark.parametrize("name, low, call, integral", [c[1:] for c in COUNTS],
                         ids=[c[0] for c in COUNTS])
def test_a_count_that_is_no_count_gets_one_answer(name, low, call, integral, wrong):
    value, kind, got = {
        "float": (integral, TypeError, rf"{re.escape(repr(integral))} \(float\): .* round\(\)"),
        "bool": (True, TypeError, r"True \(bool\): .* round\(\)"),
        "too-small": (low - 1, ValueError, rf"{low - 1}$"),
    }[wrong]
    with pytest.raises(kind) as info:
        call(value)
    assert re.search(rf"^{re.escape(name)} must be an int >= {low}, got {got}",
                     str(info.value)), str(info.value)


# Every seed of the API goes through qerror._checks.check_seed: an integer from 0 to
# 2**64 - 1, the range of torch's generators. Before, the rule was a count's (>= 0) and
# stopped there: 2**64 was refused in torch's words ('Overflow when unpacking long long'),
# by the weightless module's and AdaRound's own limits, or taken (SeedSequence, numpy's
# default_rng), and a generator= seed refused -1 in numpy's words ('expected non-negative
# integer', the bootstrap) or keyed stochastic rounding with it masked to 64 bits: -1 and
# 2**64 - 1 gave the same draws, 2**64 those of 0.
def _mse_calibrate(v):
    return calibrate(X, _STOCHASTIC, RangePolicy(method="mse", mse_grid=4), generator=v)


_XS = np.linspace(-1.0, 1.0, 40)
# (case id, the argument as the message names it, a call with the seed v, whether a valid
# seed's call is cheap enough to run here)
SEEDS = [
    ("stochastic-key", "generator", stochastic_key, True),
    ("fake-quantize-generator", "generator",
     lambda v: fake_quantize(X, _STOCHASTIC, 0.1, generator=v), True),
    ("quantize-generator", "generator", lambda v: quantize(X, _STOCHASTIC, 0.1, generator=v),
     True),
    ("apply-rounding-generator", "generator",
     lambda v: apply_rounding(X, RoundingMode.STOCHASTIC, generator=v), True),
    ("calibrate-generator", "generator", _mse_calibrate, True),
    ("bootstrap-ci-generator", "generator",
     lambda v: bootstrap_ci(_XS, np.mean, generator=v, n_resamples=39), True),
    ("mse-ratio-ci-generator", "generator",
     lambda v: mse_ratio_ci(_XS + 0.1, _XS - 0.2, paired=True, method="bootstrap",
                            n_resamples=39, generator=v), True),
    ("splits-seed", "seed", lambda v: data.fashion_mnist_splits("/nonexistent", seed=v), False),
    ("tiny-cnn-seed", "seed", lambda v: TinyCNN(2, seed=v), True),
    ("seeded-mapping-seed", "seed", lambda v: seeded_mapping(4, 4, v), True),
    ("seeded-mapping-stream", "stream", lambda v: seeded_mapping(4, 4, 0, v), True),
    ("wisard-seed", "seed", lambda v: WiSARD(8, 4, 2, seed=v), True),
    ("lut-layer-seed", "seed", lambda v: LUTLayer(8, 2, 2, seed=v), True),
    ("lut-layer-stream", "stream", lambda v: LUTLayer(8, 2, 2, stream=v), True),
    ("fit-dwn-seed", "seed", lambda v: fit_dwn(None, None, None, None, seed=v), False),
    ("train-config-seed", "TrainConfig.seed",
     lambda v: TrainConfig(epochs=1, batch_size=2, lr=0.1, seed=v), True),
    ("adaround-seed", "seed", lambda v: AdaRoundSettings(bits=4, seed=v), True),
    ("updown-seed", "seed (rounding k draws from numpy.random.SeedSequence([seed, k]))",
     lambda v: updown_experiment(_model(), "0", _images(), seed=v), False),
    ("bootstrap-seed",
     "seed (fixed, so that the bootstrap's resamples are the same on every call)",
     lambda v: layer_block_bootstrap(_DEPTH, _DEPTH, resamples=100, seed=v), True),
    ("fashion-resnet-seed", "seed", lambda v: fashion_resnet("resnet18", seed=v), False),
    ("small-cnn-seed", "seed", lambda v: fashion_small_cnn(4, seed=v), True),
    ("plain-chain-seed", "seed", lambda v: plain_chain(2, 2, seed=v), True),
    ("time-training-step-seed", "seed", lambda v: time_training_step(seed=v), False),
    ("early-exit-seed", "seed", lambda v: _early_exit_resnet(seed=v), False),
    ("cross-validate-seed", "seed", lambda v: _cross_validate(seed=v), True),
    ("quant-config-make-seed", "QuantConfig.seed", lambda v: QuantConfig.make(8, seed=v),
     True),
    ("quant-config-seed", "QuantConfig.seed",
     lambda v: QuantConfig(None, _ACTIVATIONS, seed=v), True),
    ("calibrate-activations-seed", "seed",
     lambda v: calibrate_activations(_model(), _images(), _ACTIVATIONS, seed=v), True),
    ("quantize-weights-seed", "seed", lambda v: quantize_weights(_model(), _STOCHASTIC, seed=v),
     True),
    ("quantize-survivors-seed", "seed",
     lambda v: quantize_survivors(_model(), QuantSpec(axis=0, rounding=RoundingMode.STOCHASTIC),
                                  seed=v), True),
    ("network-statements-seed", "seed",
     lambda v: _statements(network_statements, seed=v), False),
    ("image-outcomes-seed", "seed", lambda v: _statements(image_outcomes, seed=v), False),
    ("crosscheck-model-seed", "seed", _crosscheck, False),
    ("tail-share-normal-seed", "seed", lambda v: tail_share_normal(20, 2, 3, v), True),
    ("quantize-offline-seed", "seed", _offline, True),
]


@pytest.mark.parametrize("wrong", ["float", "bool", "negative", "numpy-negative", "too-large"])
@pytest.mark.parametrize("name, call, cheap", [c[1:] for c in SEEDS], ids=[c[0] for c in SEEDS])
def test_a_seed_outside_64_bits_gets_one_answer(name, call, cheap, wrong):
    value, kind, got = {
        "float": (2.0, TypeError, r"2\.0 \(float\)"),
        "bool": (True, TypeError, r"True \(bool\)"),
        "negative": (-1, ValueError, r"-1: "),
        "numpy-negative": (np.int64(-1), ValueError, r"np\.int64\(-1\): "),
        "too-large": (2 ** 64, ValueError, r"18446744073709551616: "),
    }[wrong]
    # a generator= argument's TypeError also names the generators it takes
    takes = r"an int seed from 0 to 2\*\*64 - 1, a numpy\.random\.Generator or a " \
        r"torch\.Generator" if name == "generator" and kind is TypeError \
        else r"an int from 0 to 2\*\*64 - 1"
    with pytest.raises(kind) as info:
        call(value)
    assert re.search(rf"^{re.escape(name)} must be {takes}, got {got}", str(info.value)), \
        str(info.value)


@pytest.mark.parametrize("value", [0, 2 ** 64 - 1, np.uint64(2 ** 64 - 1)],
                         ids=["0", "2**64-1", "numpy-2**64-1"])
@pytest.mark.parametrize("call", [c[2] for c in SEEDS if c[3]], ids=[c[0] for c in SEEDS if c[3]])
def test_every_64_bit_seed_is_taken(call, value):
    call(value)


def test_torch_cpu_draws_read_a_seeds_low_32_bits_as_documented():
    """qerror.MAX_SEED's comment, check_seed's Notes and the studies' --seed help say
    that torch's CPU generator starts from a seed's low 32 bits, so torch-made draws repeat
    for seeds 2**32 apart while numpy's differ. If a torch release changes that, this fails
    and the three texts must change with it."""
    def torch_draws(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(64, generator=g).tolist(), torch.rand(4, generator=g).tolist()

    assert torch_draws(5) == torch_draws(5 + 2**32) == torch_draws(5 + 2**63)
    assert torch_draws(5) != torch_draws(6)
    assert (np.random.default_rng(5).permutation(64).tolist()
            != np.random.default_rng(5 + 2**32).permutation(64).tolist())


@pytest.mark.parametrize("make", [
    lambda seed: QuantConfig.make(8, "nearest_even", seed=seed),
    lambda seed: TrainConfig(epochs=1, batch_size=8, lr=0.1, seed=seed)])
def test_a_config_stores_a_numpy_seed_as_a_python_int(make):
    """A configuration is written into manifests with json, which refuses numpy integers,
    and compared and hashed with other configurations: its seed is kept as a Python int."""
    config = make(np.uint64(2**64 - 1))
    assert type(config.seed) is int and config.seed == 2**64 - 1
    assert json.dumps(config.seed) == str(2**64 - 1)
    assert make(np.int64(3)) == make(3)
