"""qerror.nn.seeds: the network claims' quantities measured on one network."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from qerror.nn.models import plain_chain
from qerror.nn.seeds import (
    STATEMENT_MODES,
    fraction_holding,
    image_outcomes,
    network_statements,
)
from tests.qerror.nn.ranks import as_rank, record_calls, two_ranks


def _warmed(depth=4, width=4, seed=0):
    """A small plain chain whose BatchNorm statistics fit its own activations."""
    model = plain_chain(depth=depth, width=width, seed=seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()
        model(torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def test_every_quantity_for_every_width_and_mode():
    model = _warmed()
    g = torch.Generator().manual_seed(2)
    calib, test = torch.randn(64, 1, 8, 8, generator=g), torch.randn(96, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (96,), generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st = network_statements(model, calib, test, labels, bits=(8, 4), batch=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    quantities = {"drift_deep", "growth", "growth_lo", "growth_ac1", "bn_worst", "sat_first",
                  "sat_last", "accuracy", "float_accuracy"}
    assert len(st) == 2 * len(STATEMENT_MODES) * len(quantities)
    assert set(st.quantity) == quantities
    # every quantity is measured; the interval's end alone may be undefined (nan), where
    # too many resamples of this untrained network's layers leave under three usable depths
    interval = st.quantity == "growth_lo"
    assert np.isfinite(st.value[~interval]).all()
    assert not np.isinf(st.value[interval]).any()
    acc = st[st.quantity.isin(["accuracy", "float_accuracy"])].value
    # accuracies are counts over the 96 images
    assert np.allclose(acc * 96, np.round(acc * 96)) and acc.between(0, 1).all()
    # the float network is the same under every mode and width
    assert st[st.quantity == "float_accuracy"].value.nunique() == 1
    # truncation and floor leave more per-channel drift at the deepest conv than nearest at
    # four bits on this network (a deterministic check of the wiring, not a claim)
    d = st[(st.quantity == "drift_deep") & (st.bits == 4)].set_index("mode").value
    assert d["toward_zero"] > d["nearest_even"] and d["floor"] > d["nearest_even"]


def test_the_models_own_mode_is_left_as_it_was():
    # measured in evaluation mode, and a model that was training is training again after
    model = _warmed().train()
    g = torch.Generator().manual_seed(3)
    x, labels = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    st = network_statements(model, x, x, labels, bits=(8,), modes=("nearest_even",))
    assert all(m.training for m in model.modules())
    evaluated = network_statements(model.eval(), x, x, labels, bits=(8,),
                                   modes=("nearest_even",))
    assert st.equals(evaluated)


def test_a_network_without_convolutions_is_refused_with_the_reason():
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 10))
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="convolutions"):
        network_statements(mlp, x, x, torch.zeros(8, dtype=torch.long), bits=(8,))


def test_image_outcomes_are_the_images_behind_the_accuracies():
    """Per width and mode, the images image_outcomes calls correct number the accuracy
    network_statements measures (the same quantized network, image by image), and the float
    rows its float accuracy; the model's state and mode are left as they were."""
    model = _warmed().train()
    g = torch.Generator().manual_seed(5)
    calib, test = torch.randn(64, 1, 8, 8, generator=g), torch.randn(80, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (80,), generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = image_outcomes(model, calib, test, labels, bits=(8, 4), batch=32)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    st = network_statements(model, calib, test, labels, bits=(8, 4), batch=32)
    assert len(out) == (1 + 2 * len(STATEMENT_MODES)) * 80
    for (bits, mode), d in out.groupby(["bits", "mode"]):
        assert d.image.tolist() == list(range(80)) and d.correct.dtype == bool
        if mode == "float":
            want = st[st.quantity == "float_accuracy"].value.iloc[0]
        else:
            want = st[(st.quantity == "accuracy") & (st.bits == bits)
                      & (st["mode"] == mode)].value.item()
        assert int(d.correct.sum()) == round(want * 80), (bits, mode)
    # the counts alone could agree by chance: truncation at four bits changes which images
    q4 = out[out.bits == 4].pivot(index="image", columns="mode", values="correct")
    assert (q4["nearest_even"] != q4["toward_zero"]).any()


def test_statement_values_refuse_a_result_without_quantized_activations():
    """A weights-only result fell on float(None), a bare TypeError naming no quantity."""
    import dataclasses

    from qerror.nn.propagate import QuantConfig, calibrate_activations, measure
    from qerror.nn.seeds import statement_values

    model = _warmed()
    g = torch.Generator().manual_seed(6)
    x, labels = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    config = QuantConfig.make(8)
    act = calibrate_activations(model, [x], config.activation)
    res = measure(model, [(x, labels)], dataclasses.replace(config, activation=None), act)
    with pytest.raises(ValueError, match="activations are not quantized"):
        statement_values(res)


def test_labels_must_match_images():
    model = _warmed()
    with pytest.raises(ValueError, match="3 test images but 2 labels"):
        network_statements(model, torch.zeros(4, 1, 8, 8), torch.zeros(3, 1, 8, 8),
                           torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="3 test images but 2 labels"):
        image_outcomes(model, torch.zeros(4, 1, 8, 8), torch.zeros(3, 1, 8, 8),
                       torch.zeros(2, dtype=torch.long))


def test_fraction_holding_is_the_wilson_interval():
    r = fraction_holding([True] * 18 + [False] * 2)
    assert r.estimate == 0.9
    # Wilson 95% for 18/20, by its closed form
    z = 1.959963984540054
    n, p = 20, 0.9
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert r.ci == pytest.approx((centre - half, centre + half), rel=1e-12)
    with pytest.raises(ValueError, match="non-empty"):
        fraction_holding([])


def test_fraction_holding_refuses_values_that_are_not_booleans():
    """A NaN seed read as True (15 NaN and 5 False gave 'most')."""
    with pytest.raises(TypeError, match="booleans"):
        fraction_holding(np.array([np.nan] * 15 + [0.0] * 5))
    with pytest.raises(TypeError, match="booleans"):
        fraction_holding([1, 0, 1])
    assert fraction_holding(np.array([True, False])).estimate == 0.5


def test_bn_worst_counts_a_collapsed_variance_and_says_when_nothing_was_measured():
    """A channel whose quantized variance collapsed to 0 was dropped (0.0, 'consistent');
    no BatchNorm measured gave 0.0 too, which N2 counted as consistent."""
    from types import SimpleNamespace

    from qerror.nn.bn import BNInconsistency
    from qerror.nn.seeds import _bn_worst

    def worst(var_q, var_f=(1.0, 1.0)):
        one = np.ones(2)
        bn = BNInconsistency.from_stats(one, np.array(var_f), one, np.array(var_q), one, one)
        return _bn_worst(SimpleNamespace(sites=[SimpleNamespace(kind="bn", bn=bn)]))

    assert worst([1.0, 0.0]) == np.inf  # |log 0|
    assert worst([1.0, 2.0], var_f=(1.0, 0.0)) == np.inf  # variance where float had none
    assert worst([1.0, 0.0], var_f=(1.0, 0.0)) == 0.0  # 0/0 in one channel: not measured
    # |log| of the geometric mean: log of the double nearest e, within u = 2**-53 of 1, by a
    # log accurate to an ulp (2**-52 above 1): within 3 u
    assert worst([np.e, np.e]) == pytest.approx(1.0, rel=3 * 2**-53, abs=0)
    assert np.isnan(_bn_worst(SimpleNamespace(sites=[])))


def test_bn_moments_bytes_refuses_what_is_no_count_of_images():
    """A negative count gave negative bytes (-384 for -1 image) and a float was truncated
    without a word (0.29 * 100 images counted as 28)."""
    from qerror.nn.seeds import bn_moments_bytes

    model = plain_chain(depth=3, width=4)
    assert bn_moments_bytes(model, 10) == 4 * 8 * 12 * 10
    assert bn_moments_bytes(model, np.int64(5)) == 4 * 8 * 12 * 5
    with pytest.raises(ValueError, match="images"):
        bn_moments_bytes(model, -1)
    for bad in (0.29 * 100, 2.7, True):
        with pytest.raises(TypeError, match="images"):
            bn_moments_bytes(model, bad)


def _eighty_images():
    """A warmed 5-layer network, 80 seeded test images with labels in batches of 48 and 32,
    and its 4-bit activation ranges calibrated on 64 other images."""
    from qerror.nn.propagate import QuantConfig, calibrate_activations

    model = _warmed(depth=5, width=6)
    g = torch.Generator().manual_seed(4)
    calib, test = torch.randn(64, 1, 8, 8, generator=g), torch.randn(80, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (80,), generator=g)
    batches = [(test[:48], labels[:48]), (test[48:], labels[48:])]
    return model, batches, calibrate_activations(model, [calib], QuantConfig.make(4).activation)


def test_bn_image_moments_give_the_instruments_bn_worst_and_bounds_around_it():
    """The per-image moments taken beside a paired pass give, for the sample itself, the
    figure statement_values' bn_worst takes from measure's sums (two summation routes of
    the same float32 sums: equal to float64 rounding), and bounds on either side
    of it (set on the debiased figure, at most the plain one); the deepest drift's gap is the difference of two drift_deep figures."""
    from qerror.nn.bn import inconsistency_bounds
    from qerror.nn.propagate import QuantConfig, measure
    from qerror.nn.seeds import bn_image_moments, deepest_drift_gap, statement_values
    from qerror.rounding import RoundingMode

    model, batches, act = _eighty_images()
    res = {}
    # stochastic rounding too: the paired pass draws measure's streams on the same batches
    for mode in (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO, RoundingMode.STOCHASTIC):
        cfg = QuantConfig.make(4, mode)
        res[mode] = r = measure(model, batches, cfg, act, image_means=80)
        moments = bn_image_moments(model, batches, cfg, act)
        assert list(moments) == [n for n, m in model.named_modules()
                                 if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(m.images == 80 for m in moments.values())
        worst = statement_values(r)["bn_worst"]
        # rel 1e-9: the same float32 sums added over images in two float64 orders, then
        # E[x²] − E[x]², whose cancellation can cost digits (measured equal here)
        ones = np.ones((1, 80))
        assert max(float(m.figures(ones)[0]) for m in moments.values()) == pytest.approx(
            worst, rel=1e-9)
        b = inconsistency_bounds(moments, resamples=200)
        assert b.worst == pytest.approx(worst, rel=1e-9) and b.layers == len(moments)
        # the bounds are set on the debiased figure, at most the plain one
        assert b.some_lo <= b.worst and b.some_lo <= b.all_hi
        assert b.exceeds(b.some_lo - 0.01) is True and b.exceeds(b.all_hi + 0.01) is False
        assert b.exceeds((b.some_lo + b.all_hi) / 2) is None
    n, t = (statement_values(res[m])["drift_deep"]
            for m in (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO))
    gap = deepest_drift_gap(res[RoundingMode.TOWARD_ZERO], res[RoundingMode.NEAREST_EVEN],
                            resamples=200)
    assert gap.gap == pytest.approx(t - n, rel=1e-9, abs=1e-12)
    assert gap.lo <= gap.gap <= gap.hi
    # a result that kept fewer images than it measured cannot be resampled honestly
    short = measure(model, batches, QuantConfig.make(4), act, image_means=40)
    with pytest.raises(ValueError, match="keeps the drift of 40 of its 80 images"):
        deepest_drift_gap(short, res[RoundingMode.NEAREST_EVEN], resamples=200)


def test_the_first_images_kept_are_those_of_the_whole_pass():
    """``images`` keeps the first rows of the moments of every image (stochastic rounding's
    draws included), and a pass stops once it holds them; ``kept_images`` takes the gap over
    the images two results kept, which must be that many."""
    from qerror.nn.growth import debiased_gap
    from qerror.nn.propagate import QuantConfig, measure
    from qerror.nn.seeds import _convs, _deepest, bn_image_moments, deepest_drift_gap
    from qerror.rounding import RoundingMode

    model, batches, act = _eighty_images()
    for mode in (RoundingMode.NEAREST_EVEN, RoundingMode.STOCHASTIC):
        cfg = QuantConfig.make(4, mode)
        whole = bn_image_moments(model, batches, cfg, act)
        for k in (50, 48, 3):
            ran = []
            kept = bn_image_moments(model, (ran.append(b) or b for b in batches), cfg, act,
                                    images=k)
            assert len(ran) == (2 if k > 48 else 1)  # the batch holding the k-th image last
            for name, m in kept.items():
                assert m.images == k and m.length == whole[name].length
                for a in ("mean_f", "sq_f", "mean_q", "sq_q"):
                    assert np.array_equal(getattr(m, a), getattr(whole[name], a)[:k])
    with pytest.raises(ValueError, match="images"):
        bn_image_moments(model, batches, QuantConfig.make(4), act, images=0)
    trunc, near = (measure(model, batches, QuantConfig.make(4, m), act, image_means=40)
                   for m in (RoundingMode.TOWARD_ZERO, RoundingMode.NEAREST_EVEN))
    got = deepest_drift_gap(trunc, near, resamples=200, seed=1, kept_images=40)
    a, b = _deepest(_convs(trunc)), _deepest(_convs(near))
    want = debiased_gap(a.drift_image_channel, a.float_std_channel, b.drift_image_channel,
                        b.float_std_channel, resamples=200, seed=1)
    assert got == want and a.drift_image_channel.shape[0] == 40
    with pytest.raises(ValueError, match="keeps the drift of 40 of its 80 images, not the "
                                         "first 50"):
        deepest_drift_gap(trunc, near, resamples=200, kept_images=50)


def _rank_held(rank, world, port, folder):
    """One gloo rank of :func:`test_ranks_keep_the_first_images_alone`: a batch of 4 images
    a rank, the first 3 images' moments (``bn_image_moments``) and kept means (``measure``,
    the storage behind each site's as its result is made); the rows kept and the rows held
    go to ``folder / rank<r>.txt``."""
    from qerror.nn import propagate, training
    from qerror.nn.seeds import bn_image_moments

    as_rank(rank, world, port)
    model, config, aq, batches = _stochastic_moments()
    share = [(batches[rank][0], torch.zeros(4, dtype=torch.int64))]
    held = []
    site_result = propagate._site_result

    def spy(acc, *args, **kwargs):
        for t in acc.err.kept:
            held.append(t.untyped_storage().nbytes() // (t.element_size() * t.shape[1]))
        return site_result(acc, *args, **kwargs)

    with training.distributed("cpu"):
        moments = bn_image_moments(model, share, config, aq, first_batch=rank,
                                   across_ranks=True, images=3)
        arrays = [getattr(m, k) for m in moments.values()
                  for k in ("mean_f", "sq_f", "mean_q", "sq_q")]
        propagate._site_result = spy
        try:
            res = propagate.measure(model, share, config, aq, image_means=3, first_batch=rank,
                                    across_ranks=True)
        finally:
            propagate._site_result = site_result
    kept = {len(s.drift_image_channel) for s in res.sites if s.drift_image_channel is not None}
    (folder / f"rank{rank}.txt").write_text(
        f"moments: {sorted({len(a) for a in arrays})} kept, "
        f"{sorted({len(a if a.base is None else a.base) for a in arrays})} held; "
        f"means: {sorted(kept)} kept, {sorted(set(held))} held")


def test_ranks_keep_the_first_images_alone(tmp_path):
    """Under torchrun each rank keeps its own first ``images`` and the gather kept the first
    of them in rank order as a slice of all: a view holding every rank's rows, the world
    size times the images counted (/work/runs/s51/diff/probe_views.py: two ranks of 20
    images, the first 4 kept in 8 rows by every BatchNorm's moments as returned, and by
    every site's kept means until its result is made; here 3 in 6). Now each holds the rows
    it keeps alone."""
    two_ranks(_rank_held, tmp_path)
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text() == (
            "moments: [3] kept, [3] held; means: [3] kept, [3] held")


def test_bn_image_moments_refuse_a_model_without_batchnorm():
    from qerror.nn.propagate import QuantConfig
    from qerror.nn.seeds import bn_image_moments

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval()
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        bn_image_moments(model, [(torch.zeros(2, 1, 5, 5), None)], QuantConfig.make(8), {})


def _rank_moments(rank, world, port, folder):
    """One gloo rank of :func:`test_bn_image_moments_stop_every_rank_when_one_fails`: seven
    ``bn_image_moments`` calls with ``across_ranks`` on a float32 network, 4 images a rank:
    float64 images on rank 1; on rank 1 a network with one BatchNorm of the same width as
    the first of rank 0's six; on rank 1 a floor configuration; on rank 1 activation ranges
    calibrated on other images; on rank 1 quantized weights with one layer's doubled; on
    rank 1 the model's name instead of the model; then images both can take, whose moments are compared with one process's on both ranks'
    batches. What each returned or raised goes to ``folder / rank<r>.txt``, a line each
    (written after every call, so a hang shows how far a rank got)."""
    from torch import nn

    from qerror.nn import training
    from qerror.nn.propagate import (
        MadeFor,
        QuantConfig,
        calibrate_activations,
        quantize_weights,
    )
    from qerror.nn.seeds import bn_image_moments
    from tests.qerror.nn.nets import images, tiny_resnet

    as_rank(rank, world, port)
    config = QuantConfig.make(4)
    model = tiny_resnet(dtype=torch.float32)
    aq = calibrate_activations(model, [images(8, 1, torch.float32)], config.activation)
    torch.manual_seed(5)
    short = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    short_aq = calibrate_activations(short, [images(8, 1, torch.float32)], config.activation)
    mine = [images(4, 2 + r, torch.float32) for r in range(world)]
    x = mine[rank]
    floor = QuantConfig.make(4, "floor")
    own = calibrate_activations(model, [images(8, 1 + 10 * rank, torch.float32)],
                                config.activation)
    weights = quantize_weights(model, config.weight)
    first = next(iter(weights))
    doubled = MadeFor({**weights, first: dataclasses.replace(
        weights[first], weight=2 * weights[first].weight)}, weights.spec)
    nudged = copy.deepcopy(model)  # another checkpoint: one weight a float32 step away
    with torch.no_grad():
        w0 = next(nudged.parameters()).view(-1)
        w0[0] = torch.nextafter(w0[0], torch.tensor(math.inf))
    calls = [(model, aq, x.double() if rank == 1 else x),
             (short, short_aq, x) if rank == 1 else (model, aq, x),
             (model, aq, x, floor if rank == 1 else config),
             (model, own, x),
             (model, aq, x, config, doubled if rank == 1 else weights),
             ("tiny_resnet" if rank == 1 else model, aq, x),
             (nudged if rank == 1 else model, aq, x),
             (model, aq, x)]
    def call(net, act, batch, given=config, w=None):
        got = bn_image_moments(net, [(batch, None)], given, act, weights=w, across_ranks=True)
        alone = bn_image_moments(net, [(m, None) for m in mine], given, act, weights=w)
        same = list(got) == list(alone) and all(
            np.array_equal(getattr(got[n], k), getattr(alone[n], k))
            for n in got for k in ("mean_f", "sq_f", "mean_q", "sq_q"))
        return (f"{len(got)} BatchNorms, {got[next(iter(got))].images} images, "
                f"{'equal to' if same else 'NOT'} one process's")

    with training.distributed("cpu"):
        record_calls(folder / f"rank{rank}.txt", [lambda c=c: call(*c) for c in calls])


def test_bn_image_moments_stop_every_rank_when_one_fails(tmp_path):
    """A rank whose batch its network cannot take (float64 images to a float32 network)
    raised alone while the other waited in the first BatchNorm's gather: for ever while the
    failed rank lived on, or paired with that rank's next call (probe: one returned
    "6 BatchNorms, 8 images" from two calls); ranks whose models have different BatchNorm
    layers paired one rank's layers with the other's. Now the failed rank raises its own
    error and the other a RuntimeError naming it, different layers make both raise the same
    ValueError, and the next call of both ranks gathers what one process holding both
    ranks' batches gives, value for value. Ranks that passed another configuration,
    activation ranges or quantized weights gathered the moments of different quantized
    networks without a word (/work/runs/s44/ranks/probe.py bn, probe_bn.before.log); now
    every rank raises the ValueError that measure's ranks raise, naming the argument. A rank
    given something that is not a model raised an AttributeError alone, before the try that
    carries a rank's error to the others, and the other waited in the gather
    (/work/runs/s44/ranks2/probe.py model, probe_model.before.log); now it raises
    measure's TypeError and the other the RuntimeError naming it. Ranks whose models differ
    in one weight by a float32 step (another checkpoint) merged their moments without a
    word; now every rank raises the same ValueError naming the model."""
    two_ranks(_rank_moments, tmp_path)
    said = [(tmp_path / f"rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert len(said[0]) == len(said[1]) == 8
    assert said[1][0].startswith("RuntimeError: ")  # torch's, from the float32 forward
    assert said[0][0] == (
        "RuntimeError: rank 1 of 2 failed before the ranks' BatchNorm moments were gathered "
        f"(rank 1: {said[1][0]}), so every rank stops here instead of waiting for them: see "
        "each failed rank's own error, fix what it names, and call again on every rank")
    assert said[0][1] == said[1][1] == (
        "ValueError: the ranks' models have different BatchNorm2d layers (rank 0: 6 with 72 "
        "channels, rank 1: 1 with 8 channels); every rank must pass the same model, for its "
        "images' moments to be gathered layer by layer")

    def differ(name, told):
        return (f"ValueError: the ranks passed different {name} ({told}); every rank must "
                "pass the same model, config, act_qparams, weights (only the batches and "
                "first_batch "
                "are each rank's own), for their moments to be one measurement")

    assert said[0][2:5] == said[1][2:5] == [
        differ("config", "rank 0: nearest_even-4b-both, rank 1: floor-4b-both"),
        differ("act_qparams", "in value"), differ("weights", "in value")]
    assert said[1][5] == "TypeError: model must be a torch.nn.Module, got str"
    assert said[0][5] == (
        "RuntimeError: rank 1 of 2 failed before the ranks' BatchNorm moments were gathered "
        f"(rank 1: {said[1][5]}), so every rank stops here instead of waiting for them: see "
        "each failed rank's own error, fix what it names, and call again on every rank")
    assert said[0][6] == said[1][6] == differ("model", "in value")
    assert said[0][7] == said[1][7] == "6 BatchNorms, 8 images, equal to one process's"


class _InputNorm(torch.nn.Module):
    """A float32 BatchNorm on the images in their own dtype (CPU BatchNorm takes bfloat16
    input with float32 parameters), then a float64 body on them: a convolution 1e4 above a
    spread of about one into a BatchNorm, whose variance float64's rounding resolves and
    float32's does not (a mean beyond about 1/√(3 L u) standard deviations,
    :func:`qerror.nn._moments.resolved_variance`)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.BatchNorm2d(1)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10)).double()
        with torch.no_grad():
            self.body[0].bias.fill_(1e4)
            for m in self.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = None
            self.train()
            self(torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(9)))
        self.eval()

    def forward(self, x):
        return self.body(self.norm(x).double())


def _input_norm():
    from qerror.nn.propagate import QuantConfig, calibrate_activations

    net = _InputNorm()
    config = QuantConfig.make(8)
    return net, config, calibrate_activations(net, [_images(8, 1, torch.float32)],
                                              config.activation)


def _images(n, seed, dtype):
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_bn_image_moments_resolve_variances_as_measure_does():
    """A float32 network part fed float32 images, its BatchNorm summed in float64: measure
    resolves every variance against float32's rounding (its u, the coarsest of parameters
    and images), bn_image_moments resolved this layer's against float64's, so the two
    routes to the same figure differed (/work/runs/s43/ranks3/probe_bn_roundoff.py: 0.0118
    against measure's 0.00215). Now bn_image_moments takes measure's u where it is coarser
    than the layer's own input, and the figures agree to the rounding of the float64 means
    (the shift's cancellation: ``(L + N) 2⁻⁵³`` of the mean over the running std, twice)."""
    from qerror.nn.propagate import measure
    from qerror.nn.seeds import _bn_worst, bn_image_moments

    net, config, aq = _input_norm()
    batches = [(_images(4, 2, torch.float32), None)]
    moments = bn_image_moments(net, batches, config, aq)
    worst = _bn_worst(measure(net, batches, config, aq, local_samples=0))
    m = moments["body.1"]
    bound = 2 * (m.length + m.images) * 2.0**-53 * max(
        np.abs(m.mean_f).max(), np.abs(m.mean_q).max()) / np.sqrt(m.running_var.min())
    figure = max(float(m.figures(np.ones((1, m.images)))[0]) for m in moments.values())
    assert abs(figure - worst) <= bound, (figure, worst, bound)
    assert [m.u for m in moments.values()] == [2.0**-24, 2.0**-24]


def _rank_roundoff(rank, world, port, folder):
    """One gloo rank of :func:`test_ranks_fed_other_dtypes_take_one_processs_roundoff`:
    ``bn_image_moments`` with ``across_ranks`` of 4 bfloat16 images on rank 0 and 4 float32
    on rank 1, against one process's on both ranks' batches in either order; what it found
    goes to ``folder / rank<r>.txt``."""
    from qerror.nn import training
    from qerror.nn.seeds import bn_image_moments

    as_rank(rank, world, port)
    net, config, aq = _input_norm()
    mine = [(_images(4, 2 + r, torch.bfloat16 if r == 0 else torch.float32), None)
            for r in range(world)]
    with training.distributed("cpu"):
        got = bn_image_moments(net, [mine[rank]], config, aq, across_ranks=True)
    alone = bn_image_moments(net, mine, config, aq)
    same = list(got) == list(alone) and all(
        np.array_equal(getattr(got[n], k), getattr(alone[n], k))
        for n in got for k in ("mean_f", "sq_f", "mean_q", "sq_q", "u"))
    # the other order of the batches: other rows, the same roundoff
    turned = [m.u for m in bn_image_moments(net, mine[::-1], config, aq).values()]
    said = [f"u {[m.u for m in got.values()]}",
            f"{'equal to' if same else 'NOT'} one process's",
            f"u {'equal to' if turned == [m.u for m in got.values()] else 'NOT'} one "
            "process's"]
    (folder / f"rank{rank}.txt").write_text("\n".join(said))


def test_ranks_fed_other_dtypes_take_one_processs_roundoff(tmp_path):
    """Each rank stored, for each BatchNorm, the unit roundoff of the last batch it saw
    there, unmerged: a rank fed bfloat16 images 2⁻⁸ for the input BatchNorm, one fed
    float32 2⁻²⁴, from the same gathered moments, and one process's depended on the order
    of its batches (/work/runs/s43/ranks3/probe_bn_roundoff2.py). Now it is the coarsest of
    every batch and rank (and of measure's u), carried in the gather that checks the
    layers: both ranks return one process's moments and roundoff, in either order."""
    two_ranks(_rank_roundoff, tmp_path)
    said = [(tmp_path / f"rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert said[0] == said[1] == [f"u {[2.0**-8, 2.0**-8]}", "equal to one process's",
                                  "u equal to one process's"]


def _stochastic_moments():
    """A float64 network, a stochastic 4-bit configuration, its activation ranges, and two
    batches of 4 images."""
    from qerror.nn.propagate import QuantConfig, calibrate_activations
    from qerror.rounding import RoundingMode
    from tests.qerror.nn.nets import images, tiny_resnet

    model = tiny_resnet()
    config = QuantConfig.make(4, RoundingMode.STOCHASTIC, seed=7)
    aq = calibrate_activations(model, [images(8, 1)], config.activation)
    return model, config, aq, [(images(4, 2 + r), None) for r in range(2)]


def _moment_rows(moments, rows=slice(None)):
    return [getattr(m, k)[rows] for m in moments.values()
            for k in ("mean_f", "sq_f", "mean_q", "sq_q")]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_bn_image_moments_number_their_batches_from_first_batch():
    """One process: stochastic rounding draws each batch's stream from its index,
    ``first_batch`` plus its position, so the second batch measured alone from index 1 has
    the moments it has measured after the first (images 4 to 7), and from index 0 others;
    ``first_batch`` is a count, checked as measure checks it."""
    from qerror.nn.seeds import bn_image_moments

    model, config, aq, batches = _stochastic_moments()
    both = bn_image_moments(model, batches, config, aq)
    second = bn_image_moments(model, batches[1:], config, aq, first_batch=1)
    assert _same(_moment_rows(second), _moment_rows(both, slice(4, 8)))
    assert not _same(_moment_rows(bn_image_moments(model, batches[1:], config, aq)),
                     _moment_rows(both, slice(4, 8)))
    for bad, error in ((True, TypeError), (1.0, TypeError), (-1, ValueError)):
        with pytest.raises(error, match="first_batch"):
            bn_image_moments(model, batches, config, aq, first_batch=bad)


def _rank_first(rank, world, port, folder):
    """One gloo rank of :func:`test_bn_image_moments_ranks_number_their_batches_apart`:
    stochastic rounding, one batch a rank, ``bn_image_moments`` with ``across_ranks`` and
    ``first_batch`` left at 0 on both ranks, then ``rank`` (the ranks' shares in order),
    then ``1 - rank`` (the other order); each against one process on both batches in the
    order of their indices, rows in rank order. What each returned or raised goes to
    ``folder / rank<r>.txt``, a line each."""
    from qerror.nn import training
    from qerror.nn.seeds import bn_image_moments

    as_rank(rank, world, port)
    model, config, aq, batches = _stochastic_moments()
    alone = _moment_rows(bn_image_moments(model, batches, config, aq))
    turned = _moment_rows(bn_image_moments(model, batches[::-1], config, aq))
    # rank 0's rows first: with its batch at index 1, the second half of ``turned``
    swapped = [np.concatenate([t[4:], t[:4]]) for t in turned]

    def call(expected, **first):
        got = bn_image_moments(model, [batches[rank]], config, aq, across_ranks=True, **first)
        return (f"{got[next(iter(got))].images} images, "
                f"{'equal to' if _same(_moment_rows(got), expected) else 'NOT'} one process's")

    with training.distributed("cpu"):
        record_calls(folder / f"rank{rank}.txt", [
            lambda: call(alone), lambda: call(alone, first_batch=rank),
            lambda: call(swapped, first_batch=1 - rank)])


def test_bn_image_moments_ranks_number_their_batches_apart(tmp_path):
    """bn_image_moments numbered each rank's batches from 0 (paired_forward's count), so
    under stochastic rounding both ranks drew the same streams for different images and
    gathered moments that no single process gives (/work/runs/s44/ranks2/probe.py first,
    probe_first.before.log: images 4 to 7 differ from one process's on both ranks). Now it
    takes ``first_batch`` as measure does, and ranks whose batch indices overlap all raise
    measure's ValueError; disjoint indices, in rank order or not, give one process's
    moments value for value."""
    two_ranks(_rank_first, tmp_path)
    said = [(tmp_path / f"rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert said[0] == said[1] == [
        "ValueError: the ranks' batch indices overlap (rank 0: 0 to 0, rank 1: 0 to 0): "
        "stochastic rounding draws each batch's stream from its index, first_batch plus its "
        "position in the rank's batches, so ranks whose indices overlap draw the same numbers "
        "for different images, which one process never does; give each rank first_batch = the "
        "index of its first batch among all the ranks' (with qerror.nn.parallel.shard over n "
        "batches: shard(n).start)",
        "8 images, equal to one process's", "8 images, equal to one process's"]
