"""What each rounding mode does to a value's error: exact, uniform-model and Monte Carlo.

Three parts, each written as tidy data, figures and LaTeX tables:

1. Regime sweep: every rounding mode × input law (uniform, normal, Laplace, Student-t with
   5 degrees of freedom, and the one-sided half-normal, no mass at zero) × σ/step
   from 0.05 to 10 × 2–8 and 16 bits. The exact moments (:func:`qerror.analytic.error_moments`)
   beside the uniform-noise model and beside a Monte-Carlo estimate with its confidence
   interval; where the uniform model fails and by how much.
2. Clipping: the exact MSE as a function of the clipping value for 2–8 and 16 bits, and the
   MSE-optimal clipping value per bit width, compared like for like: ACIQ and the exact
   optimum on ACIQ's mid-rise grid, the exact optimum on the integer grid, and the
   Lloyd–Max non-uniform quantizer as the floor under both.
3. Error histograms in LSB for each mode, for a wide and a narrow input.

With a trained baseline in the cache (``python -m studies.train``), or with
``--checkpoint PATH``, a fourth part quantizes the real weights of every conv and linear
layer per channel with each mode and reports their exact error moments (a finite set of
weights: no sampling; for stochastic rounding, the expectation over its draws) beside the
uniform model. A ``--smoke`` run given no ``--checkpoint`` measures the baseline's
architecture untrained instead (seeded; its BatchNorm statistics estimated on the
calibration images), so that it runs every part on any machine, cache or not.

Run: ``python -m studies.rounding`` (``--smoke`` for the test suite's tiny preset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from tqdm import tqdm

from qerror import QuantSpec, RoundingMode, bias_test, fake_quantize
from qerror.analytic import ClipMethod, Grid, error_moments, optimal_clip
from qerror.files import sha256_file
from qerror.nn import eval_mode
from qerror.nn.bn import estimate_running_stats
from qerror.nn.models import Arch, fashion_resnet
from qerror.nonuniform import lloyd_max
from studies._common import (
    DATA_ROOT_HELP,
    PRINT_WIDTH,
    RunDir,
    StudyError,
    base_parser,
    check_out,
    check_trained_on,
    figure_style,
    first_three,
    held_out,
    int_at_least,
    row_width,
    study_main,
    user_path,
)
from studies._latex import signed

ALPHA = 0.001  # two-sided level of every Monte-Carlo interval in this study
UNIFORM_TOLERANCE = 0.01  # "the uniform model holds": |exact/model - 1| below this, for MSE
# A Monte-Carlo mean of e or e² is normal enough for a z-interval only when clamped values
# are a negligible part of the MSE. Where they dominate, their errors are large and (for
# heavy-tailed laws) skewed: a sample holds few of the values that make the moment, its
# mean is usually below it, and its standard error is itself unreliable. Those rows are
# kept and counted apart; the exact engine is checked against quadrature there instead.
MAX_CLIP_SHARE = 0.01


@dataclass(frozen=True)
class Law:
    """An input law scaled to unit standard deviation (one-sided: its parent's σ = 1)."""

    name: str
    dist: object
    one_sided: bool = False


def laws(names: list[str] | None = None) -> list[Law]:
    every = [
        Law("uniform", sps.uniform(-math.sqrt(3.0), 2.0 * math.sqrt(3.0))),
        Law("normal", sps.norm()),
        Law("laplace", sps.laplace(scale=1.0 / math.sqrt(2.0))),
        Law("student_t5", sps.t(5, scale=math.sqrt(3.0 / 5.0))),
        Law("half_normal", sps.halfnorm(), one_sided=True),
    ]
    if names is None:
        return every
    known = {law.name: law for law in every}
    unknown = set(names) - set(known)
    if unknown:
        raise ValueError(f"unknown law(s) {sorted(unknown)}; choose from {sorted(known)}")
    return [known[n] for n in names]


def spec_for(law: Law, bits: int, mode: RoundingMode) -> QuantSpec:
    """Symmetric signed quantizer, or unsigned with zero point 0 for a one-sided law."""
    return QuantSpec(bits=bits, signed=not law.one_sided, symmetric=True, rounding=mode)


# --------------------------------------------------------------------------- compute


METRICS = ("bias_lsb", "mse_lsb", "mae_lsb")


def mc_critical(n: int) -> float:
    """The two-sided ``1 - ALPHA`` critical value of a Monte-Carlo mean of ``n`` samples
    against its standard error: Student's t with ``n - 1`` degrees of freedom (the
    standard error is estimated), not the normal's, which is too narrow at few samples
    (``--mc-samples 10``: 4.78 against 3.29 at ``ALPHA`` 0.001)."""
    return float(sps.t.ppf(1 - ALPHA / 2, n - 1))


def regime_sweep(law_list, modes, ratios, bit_list, mc_samples, seed) -> pd.DataFrame:
    """Exact, uniform-model and Monte-Carlo moments in LSB, one row per config × metric.

    The step is fixed by σ/step, so at few bits the range ``qmax · step`` clips the law:
    the rows carry the clamping probability beside the moments. ``mc_ci_low`` and
    ``mc_ci_high`` are the mean ± :func:`mc_critical` standard errors; ``mc_z`` the mean's
    distance from the exact value in standard errors.
    """
    rows = []
    configs = [(law, mode, r, b) for law in law_list for mode in modes for r in ratios
               for b in bit_list]
    seeds = np.random.SeedSequence(seed).spawn(len(configs))
    z = mc_critical(mc_samples)
    for (law, mode, ratio, bits), ss in zip(tqdm(configs, desc="regime sweep", unit="config"),
                                            seeds):
        spec = spec_for(law, bits, mode)
        scale = 1.0 / ratio
        exact = error_moments(law.dist, spec, scale)
        rng = np.random.default_rng(ss)
        x = law.dist.rvs(size=mc_samples, random_state=rng)
        e = (fake_quantize(x, spec, scale, generator=rng) - x) / scale
        mc = {"bias_lsb": e, "mse_lsb": e * e, "mae_lsb": np.abs(e)}
        clip_share = exact.mse_clip / exact.mse if exact.mse > 0 else 0.0
        base = {"law": law.name, "mode": mode.value, "ratio": ratio, "bits": bits,
                "p_clip": exact.p_clip, "mse_clip_share": clip_share, "n_mc": mc_samples,
                "mc_valid": bool(clip_share < MAX_CLIP_SHARE)}
        for metric in METRICS:
            sample = mc[metric]
            mean = float(sample.mean())
            se = float(sample.std(ddof=1) / math.sqrt(len(sample)))
            ex = getattr(exact, metric)
            model = getattr(exact.uniform, metric)
            rows.append({**base, "metric": metric, "exact": ex, "uniform": model,
                         "gap": ex - model, "mc": mean, "mc_se": se,
                         "mc_ci_low": mean - z * se, "mc_ci_high": mean + z * se,
                         "mc_z": (mean - ex) / se if se > 0 else float(mean != ex) * math.inf})
    return pd.DataFrame(rows)


def uniform_validity(regime: pd.DataFrame) -> pd.DataFrame:
    """Per law, mode and bits: the smallest σ/step above which the uniform model's MSE is
    within UNIFORM_TOLERANCE (relative) at every larger swept ratio (NaN: at none), and the
    worst relative gap."""
    out = []
    mse = regime[regime.metric == "mse_lsb"]
    for (law, mode, bits), g in mse.groupby(["law", "mode", "bits"], sort=False):
        g = g.sort_values("ratio")
        rel = (g.exact / g.uniform - 1.0).abs().to_numpy()
        ok = rel <= UNIFORM_TOLERANCE
        # first index from which every larger ratio is within tolerance
        bad = np.nonzero(~ok)[0]
        start = 0 if len(bad) == 0 else bad[-1] + 1
        holds_from = g.ratio.iloc[start] if start < len(g) else math.nan
        out.append({"law": law, "mode": mode, "bits": bits, "holds_from_ratio": holds_from,
                    "worst_rel_gap": float(rel.max()),
                    "worst_at_ratio": float(g.ratio.iloc[int(np.argmax(rel))])})
    return pd.DataFrame(out)


def clipping_curves(law_list, bit_list, modes, alpha_grid) -> pd.DataFrame:
    """Exact MSE (real units, σ = 1) against the clipping value α, per law × bits × mode."""
    rows = []
    configs = [(law, b, m) for law in law_list for b in bit_list for m in modes]
    for law, bits, mode in tqdm(configs, desc="clipping curves", unit="curve"):
        spec = spec_for(law, bits, mode)
        for a in alpha_grid:
            em = error_moments(law.dist, spec, a / spec.qmax)
            rows.append({"law": law.name, "bits": bits, "mode": mode.value, "alpha": a,
                         "mse": em.mse, "mse_granular": em.mse_granular,
                         "mse_clip": em.mse_clip, "p_clip": em.p_clip})
    return pd.DataFrame(rows)


# Lloyd-Max converges linearly and slowly for many levels; the floor is computed up to
# 2**LLOYD_MAX_BITS levels, on the laws with closed-form cell moments.
LLOYD_MAX_BITS = 4
LLOYD_MAX_LAWS = ("normal", "laplace", "half_normal")


def clipping_optima(law_list, bit_list, modes) -> pd.DataFrame:
    """The MSE-optimal clipping compared like for like, and the non-uniform floor.

    Per law × bits × mode: ACIQ's α and the exact optimum on ACIQ's own mid-rise grid
    (levels (q + 1/2)·step; α is where the cells end, so the α's compare directly), the
    exact optimum on the integer grid that quantizers and INT8 engines use (α = qmax·step),
    ACIQ's step on that integer grid, and the Lloyd–Max quantizer with as many levels (any
    placement), the floor under every uniform grid; all MSEs exact, in σ².
    """
    rows = []
    configs = [(law, b, m) for law in law_list for b in bit_list for m in modes]
    floors = {}
    for law, bits, mode in tqdm(configs, desc="optimal clipping", unit="config"):
        kw = {"one_sided": law.one_sided}
        aciq = optimal_clip(law.dist, bits, ClipMethod.ACIQ, mode, grid=Grid.MIDRISE, **kw)
        exact_mr = optimal_clip(law.dist, bits, ClipMethod.EXACT, mode, grid=Grid.MIDRISE, **kw)
        exact_int = optimal_clip(law.dist, bits, ClipMethod.EXACT, mode, **kw)
        aciq_int = error_moments(law.dist, aciq.spec, aciq.scale).mse
        if (law.name, bits) not in floors:
            floors[law.name, bits] = (
                lloyd_max(law.dist, 2 ** bits).mse
                if bits <= LLOYD_MAX_BITS and law.name in LLOYD_MAX_LAWS else math.nan)
        floor = floors[law.name, bits]
        rows.append({"law": law.name, "bits": bits, "mode": mode.value,
                     "alpha_aciq": aciq.alpha, "alpha_exact_midrise": exact_mr.alpha,
                     "alpha_exact_integer": exact_int.alpha,
                     "step_aciq": aciq.scale, "step_exact_midrise": exact_mr.scale,
                     "step_exact_integer": exact_int.scale,
                     "mse_aciq_midrise": aciq.mse_exact, "mse_exact_midrise": exact_mr.mse_exact,
                     "mse_aciq_integer": aciq_int, "mse_exact_integer": exact_int.mse_exact,
                     "mse_lloyd_max": floor,
                     "aciq_over_exact_midrise": aciq.mse_exact / exact_mr.mse_exact,
                     "midrise_over_lloyd_max": exact_mr.mse_exact / floor,
                     "integer_over_lloyd_max": exact_int.mse_exact / floor})
    return pd.DataFrame(rows)


def error_samples(modes, ratios, n, seed) -> pd.DataFrame:
    """Monte-Carlo errors in LSB of a unit normal input, for the histograms."""
    rng = np.random.default_rng(seed)
    law = laws(["normal"])[0]
    frames = []
    for ratio in ratios:
        x = law.dist.rvs(size=n, random_state=rng)
        for mode in modes:
            spec = spec_for(law, 8, mode)
            e = (fake_quantize(x, spec, 1.0 / ratio, generator=rng) - x) * ratio
            frames.append(pd.DataFrame({"mode": mode.value, "ratio": ratio, "error_lsb": e}))
    return pd.concat(frames, ignore_index=True)


def _error_parts(x: torch.Tensor, spec: QuantSpec, scale) -> dict[str, np.ndarray]:
    """Per element of ``x``: the error in LSB (``e``), its square and absolute value, and
    whether the magnitude shrank, grew or became 0, under ``spec``; for stochastic
    rounding each is its expectation over the draws (the value goes to the code above with
    probability its distance above the code below, in steps), so the moments of a finite
    set are exact for every mode."""
    shape = (-1,) + (1,) * (x.ndim - 1) if spec.axis is not None else ()
    step = torch.as_tensor(scale, dtype=x.dtype).reshape(shape)

    def parts(q):
        e = (q - x) / step
        return {"e": e, "e2": e * e, "ae": e.abs(), "shrunk": (q.abs() < x.abs()).double(),
                "grown": (q.abs() > x.abs()).double(),
                "zeroed": ((q == 0) & (x != 0)).double()}

    if not spec.rounding.is_random:
        got = parts(fake_quantize(x, spec, np.asarray(scale)))
    else:
        lo = fake_quantize(x, spec.replace(rounding=RoundingMode.FLOOR), np.asarray(scale))
        hi = fake_quantize(x, spec.replace(rounding=RoundingMode.CEIL), np.asarray(scale))
        up = torch.where(hi > lo, (x - lo) / torch.where(hi > lo, hi - lo, 1.0), 0.0)
        down, at_hi = parts(lo), parts(hi)
        got = {k: up * at_hi[k] + (1 - up) * down[k] for k in down}
    return {k: v.reshape(-1).numpy() for k, v in got.items()}


def swept_weights(state_dict: dict) -> dict:
    """The tensors :func:`weight_errors` sweeps: floating-point conv and linear weights
    (named ``*weight``, 2 dimensions or more)."""
    return {k: v for k, v in state_dict.items()
            if k.endswith("weight") and v.ndim >= 2 and v.dtype.is_floating_point}


def weight_errors(state_dict: dict, modes, bits: int = 8) -> pd.DataFrame:
    """Exact error moments in LSB of every conv/linear weight, per-channel symmetric (for
    stochastic rounding, the expectation over its draws).

    Parameters
    ----------
    state_dict : dict of str to torch.Tensor
        Weights of at least 2 dimensions are taken (conv and linear layers); channel
        axis 0, scale ``max|w| / qmax`` per output channel.
    """
    rows = []
    weights = swept_weights(state_dict)
    if not weights:
        raise ValueError("the state dict holds no conv or linear weights (2-D or more)")
    for name, w in weights.items():
        w = w.detach().to(torch.float64).cpu()
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
        for mode in modes:
            spec = QuantSpec(bits=bits, axis=0, rounding=mode)
            scale = torch.where(amax > 0, amax / spec.qmax, torch.ones_like(amax))
            p = _error_parts(w, spec, scale.numpy())
            test = bias_test(p["e"], alpha=ALPHA)
            rows.append({"layer": name, "mode": mode.value, "bits": bits, "n": p["e"].size,
                         "bias_lsb": float(p["e"].mean()), "bias_ci_low": test.ci[0],
                         "bias_ci_high": test.ci[1], "mse_lsb": float(p["e2"].mean()),
                         "mae_lsb": float(p["ae"].mean()),
                         "frac_shrunk": float(p["shrunk"].mean()),
                         "frac_grown": float(p["grown"].mean()),
                         "frac_zeroed": float(p["zeroed"].mean())})
    return pd.DataFrame(rows)


def activation_errors(model: torch.nn.Module, images: torch.Tensor, modes,
                      bits: int = 8) -> pd.DataFrame:
    """Error moments in LSB of the input activation of every conv and linear layer.

    One forward pass in float captures each layer's input; each is then quantized per
    tensor with a min-max range (unsigned with zero point 0 when it holds no negative
    value, as after a ReLU; signed symmetric otherwise). The moments are those of this
    finite set of activations, so no sampling error enters (for stochastic rounding, the
    expectation over its draws); the model's training flag is left as it was.
    """
    from qerror import calibrate

    captured: dict[str, torch.Tensor] = {}
    hooks = []

    def keep(name):
        def hook(_module, inputs):
            captured[name] = inputs[0].detach().to(torch.float64).cpu()
        return hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                hooks.append(module.register_forward_pre_hook(keep(name)))
        if not hooks:
            raise ValueError("the model has no conv or linear layer to take activations from")
        with torch.no_grad(), eval_mode(model):
            model(images)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, a in captured.items():
        one_sided = bool((a >= 0).all())
        for mode in modes:
            spec = QuantSpec(bits=bits, signed=not one_sided, rounding=mode)
            p = _error_parts(a, spec, calibrate(a, spec).scale)
            rows.append({"layer": name, "mode": mode.value, "bits": bits, "n": p["e"].size,
                         "one_sided": one_sided, "bias_lsb": float(p["e"].mean()),
                         "mse_lsb": float(p["e2"].mean()), "mae_lsb": float(p["ae"].mean()),
                         "frac_zero_input": float(np.mean(a.numpy() == 0))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figures


def figure_regime(plt, regime: pd.DataFrame, metric: str, ylabel: str, bits: int):
    data = regime[(regime.metric == metric) & (regime.bits == bits)]
    law_names = list(dict.fromkeys(data.law))
    fig, axes = plt.subplots(1, len(law_names), figsize=(row_width(len(law_names), 3.0), 2.8),
                             sharey=True, squeeze=False)
    for ax, law in zip(axes[0], law_names):
        d = data[data.law == law]
        for i, (mode, g) in enumerate(d.groupby("mode", sort=False)):
            color = f"C{i}"
            ax.plot(g.ratio, g.exact, color=color, label=mode)
            ax.plot(g.ratio, g.uniform, color=color, ls="--", lw=0.8)
            ax.errorbar(g.ratio, g.mc, yerr=[g.mc - g.mc_ci_low, g.mc_ci_high - g.mc],
                        fmt="none", ecolor=color, elinewidth=0.6, capsize=0)
        ax.set_xscale("log")
        ax.set_title(law.replace("_", " "))
        ax.set_xlabel("σ / step")
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=6, frameon=False)
    fig.suptitle(f"{bits} bits, {ylabel}: exact (solid), uniform model (dashed), "
                 f"Monte Carlo {100 * (1 - ALPHA):g}% CI (bars)", fontsize=8)
    fig.tight_layout()
    return fig


def figure_clipping(plt, curves: pd.DataFrame, optima: pd.DataFrame, mode: str):
    data = curves[curves["mode"] == mode]
    law_names = list(dict.fromkeys(data.law))
    fig, axes = plt.subplots(1, len(law_names), figsize=(row_width(len(law_names), 3.0, 0.9), 2.8),
                             squeeze=False)
    for ax, law in zip(axes[0], law_names):
        d = data[data.law == law]
        for i, (bits, g) in enumerate(d.groupby("bits")):
            ax.plot(g.alpha, g.mse, color=f"C{i}", label=f"{bits} bits")
            o = optima[(optima.law == law) & (optima.bits == bits) & (optima["mode"] == mode)]
            if len(o):
                ax.plot(o.alpha_exact_integer, o.mse_exact_integer, "o", color=f"C{i}", ms=3)
                # ACIQ's step on this (integer) grid, placed at its largest code's value
                ax.plot(o.step_aciq * (2 ** (bits - 1) - 1 if law != "half_normal"
                                       else 2 ** bits - 1), o.mse_aciq_integer, "x",
                        color=f"C{i}", ms=4)
        ax.set_yscale("log")
        ax.set_title(law.replace("_", " "))
        ax.set_xlabel("largest code's value qmax·step / σ")
    axes[0][0].set_ylabel("exact MSE / σ²")
    axes[0][-1].legend(fontsize=6, frameon=False)
    fig.suptitle(f"{mode}: exact MSE vs clipping on the integer grid; o exact optimum, "
                 "x ACIQ's step", fontsize=8)
    fig.tight_layout()
    return fig


def figure_histograms(plt, samples: pd.DataFrame):
    ratios = sorted(samples.ratio.unique())
    modes = list(dict.fromkeys(samples["mode"]))
    # drawn at the paper's text width, so that its 6- and 7-point text prints at that size
    fig, axes = plt.subplots(len(ratios), len(modes), figsize=(PRINT_WIDTH,
                             1.6 * len(ratios)), sharex=True, squeeze=False)
    bins = np.linspace(-1.0, 1.0, 81)
    for i, ratio in enumerate(ratios):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            e = samples[(samples.ratio == ratio) & (samples["mode"] == mode)].error_lsb
            # one filled outline: bars of 80 bins with the style's white edges vanish at
            # this size
            ax.hist(np.clip(e, -1, 1), bins=bins, density=True, color=f"C{j}",
                    histtype="stepfilled", linewidth=0)
            if i == 0:
                ax.set_title(mode, fontsize=7)
            if j == 0:
                ax.set_ylabel(f"σ/step={ratio:g}", fontsize=7)
            ax.tick_params(labelsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("error (LSB)", fontsize=7)
    # the law is the normal whatever --laws says (error_samples): the figure says so
    fig.suptitle("error of a normal input, by σ/step and rounding mode", fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- main


def _macros(regime: pd.DataFrame, validity: pd.DataFrame,
            activations: pd.DataFrame | None = None) -> dict:
    """Numbers the paper's text quotes, under letter-only names (those the run has data for).

    From the baseline's activations, when measured: over the one-signed layer inputs (after a
    ReLU), truncation's bias at 8 bits (median) and its largest distance from
    ``-(1 - p0)/2``, ``p0`` the input's share of exact zeros, which carry no error."""
    wide = float(regime.ratio.max())
    at8 = regime[(regime.bits == 8) & (regime.ratio == wide)]
    def bias(v: float) -> str:  # a true minus sign, and none on a bias that rounds to 0
        return signed(v, 3)

    def mse(v: float) -> str:
        return f"{v:.4f}"

    wanted = {
        "TruncBiasHalfNormalWide": ("half_normal", "toward_zero", "bias_lsb", bias),
        "TruncBiasNormalWide": ("normal", "toward_zero", "bias_lsb", bias),
        "TruncMseNormalWide": ("normal", "toward_zero", "mse_lsb", mse),
        "NearestMseNormalWide": ("normal", "nearest_even", "mse_lsb", mse),
    }
    macros = {"WideRatio": f"{wide:g}"}
    for key, (law, mode, metric, fmt) in wanted.items():
        row = at8[(at8.law == law) & (at8["mode"] == mode) & (at8.metric == metric)]
        if len(row):
            macros[key] = fmt(float(row.exact.iloc[0]))
    v = validity[(validity.law == "normal") & (validity["mode"] == "nearest_even")
                 & (validity.bits == 8)]
    if len(v):
        macros["UniformHoldsFromNormalNearest"] = f"{float(v.holds_from_ratio.iloc[0]):.2g}"
    if activations is not None:
        relu = activations[activations.one_sided.astype(bool) & (activations.bits == 8)
                           & (activations["mode"] == "toward_zero")]
        if len(relu):
            gap = (relu.bias_lsb + (1 - relu.frac_zero_input) / 2).abs().max()
            macros.update(ReluLayers=f"{len(relu)}",
                          TruncBiasReluMedian=bias(float(relu.bias_lsb.median())),
                          TruncBiasReluZerosGap=f"{float(gap):.3f}")
    return macros


def _main(argv: list[str]) -> int:
    parser = base_parser("rounding", __doc__.splitlines()[0], force=True)
    # Ten samples at least for a standard error; two ratios at least for a sweep.
    parser.add_argument("--mc-samples", type=int_at_least(10), default=None,
                        help="Monte-Carlo samples per configuration (default 20000, smoke 2000)")
    parser.add_argument("--ratios", type=int_at_least(2), default=None,
                        help="number of σ/step values from 0.05 to 10 (default 25, smoke 4)")
    parser.add_argument("--laws", nargs="+", default=None,
                        help="input laws (default: all; smoke: normal half_normal)")
    parser.add_argument("--checkpoint", type=user_path, default=None,
                        help="a qerror checkpoint (weights and activations) or a bare state "
                             "dict (weights) to analyse; default: the cached baseline if any (--smoke: the "
                             "baseline's architecture untrained, cache or not)")
    parser.add_argument("--data-root", type=user_path, default=None,
                        help="for the activations part: " + DATA_ROOT_HELP)
    args = parser.parse_args(argv)
    smoke = args.smoke
    mc_n = args.mc_samples if args.mc_samples is not None else (2000 if smoke else 20_000)
    n_ratios = args.ratios if args.ratios is not None else (4 if smoke else 25)
    try:
        law_list = laws(list(dict.fromkeys(args.laws)) if args.laws is not None else
                        (["normal", "half_normal"] if smoke else None))
    except ValueError as err:
        parser.error(str(err))
    check_out(args.out, "rounding", force=args.force)
    modes = list(RoundingMode)
    ratios = np.geomspace(0.05, 10.0, n_ratios)
    bit_list = [4, 8] if smoke else [2, 3, 4, 5, 6, 7, 8, 16]
    clip_modes = [RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO]
    clip_laws = [law for law in law_list if law.name != "uniform"]
    alpha_grid = np.linspace(0.5, 14.0, 8 if smoke else 60)
    # --smoke with no --checkpoint: an untrained network, so that the smoke runs every part
    # whether or not a baseline is cached, and gives the same outputs with a cache or without
    untrained = smoke and args.checkpoint is None
    baseline = _untrained_baseline(args.seed) if untrained else _load_baseline(args.checkpoint)
    if args.data_root is not None and (baseline is None or baseline[1] is None):
        parser.error(f"--data-root {args.data_root}: its images feed only the activations "
                     "part, which needs a qerror checkpoint (--checkpoint, or a cached "
                     "baseline); pass one, or leave --data-root out")
    # Read before the work starts: a named folder that fails stops the run here.
    if baseline is not None and baseline[1] is not None and not untrained:
        check_trained_on(baseline[2]["info"], args.data_root)
    calib = None if baseline is None or baseline[1] is None else _calibration_images(
        args.data_root, 64 if smoke else 256,
        None if untrained else held_out(baseline[2]["info"]))
    images, data_identity = (None, None) if calib is None else calib
    if untrained and images is not None:  # its BatchNorm statistics, from those images
        estimate_running_stats(baseline[1], [images])
    config = {"mc_samples": mc_n, "ratios": ratios.tolist(), "laws": [x.name for x in law_list],
              "bits": bit_list, "alpha": ALPHA,
              "uniform_tolerance": UNIFORM_TOLERANCE, "seed": args.seed, "smoke": smoke,
              "baseline": None if baseline is None else baseline[2]}
    plt = figure_style()
    with RunDir(args.out, "rounding", argv, config, force=args.force) as run:
        if data_identity is not None:  # what the activations were computed from
            run.extra["data"] = data_identity
        regime = regime_sweep(law_list, modes, ratios, bit_list, mc_n, args.seed)
        validity = uniform_validity(regime)
        if clip_laws:  # the uniform law has no tails: nothing to clip
            curves = clipping_curves(clip_laws, bit_list, clip_modes, alpha_grid)
            optima = clipping_optima(clip_laws, [b for b in bit_list if b <= 8], clip_modes)
        samples = error_samples(modes, [0.3, 10.0], 2000 if smoke else 50_000, args.seed)
        run.write_csv("regime.csv", regime)
        run.write_csv("uniform_validity.csv", validity)
        if clip_laws:
            run.write_csv("clipping_curves.csv", curves)
            run.write_csv("clipping_optima.csv", optima)
        outside = regime.mc_z.abs() > mc_critical(mc_n)
        valid = regime.mc_valid.astype(bool)
        n_out, n_valid = int((outside & valid).sum()), int(valid.sum())
        summary = {"configs": int(len(regime) // len(METRICS)),
                   "mc_comparisons": int(len(regime)), "mc_comparisons_valid": n_valid,
                   "mc_outside_ci": n_out,
                   "expected_outside_ci_under_agreement": ALPHA * n_valid,
                   "mc_outside_ci_rare_clipping": int((outside & ~valid).sum()),
                   "mc_comparisons_rare_clipping": int((~valid).sum())}
        aerr = None  # the baseline's activation errors, where measured
        if baseline is not None:
            werr = weight_errors(baseline[0], modes)
            run.write_csv("weights.csv", werr)
            summary["weights_layers"] = int(werr.layer.nunique())
            if images is not None:
                aerr = activation_errors(baseline[1], images, modes)
                run.write_csv("activations.csv", aerr)
                summary["activation_layers"] = int(aerr.layer.nunique())
        else:
            print("[rounding] no trained baseline in the cache and no --checkpoint: the "
                  "real-weights part is skipped (python -m studies.train makes the baseline)")
        run.write_json("summary.json", summary)
        run.write_latex_table(
            "uniform_validity.tex", validity[validity.bits == 8].drop(columns="bits"),
            "Where the uniform-noise model's MSE is within "
            f"{100 * UNIFORM_TOLERANCE:g}\\% of the exact MSE (8 bits): from the ratio given "
            "on, at every larger swept ratio (--: at none).", "tab:uniform-validity")
        cols = ["law", "bits", "mode", "alpha_aciq", "alpha_exact_midrise",
                "mse_aciq_midrise", "mse_exact_midrise", "mse_exact_integer", "mse_lloyd_max"]
        if clip_laws:
            run.write_latex_table(
                "clipping_optima.tex", optima[optima["mode"] == "nearest_even"][cols],
                "MSE-optimal clipping (σ = 1, nearest rounding): ACIQ and the exact optimum on "
                "ACIQ's mid-rise grid, the exact optimum on the integer grid, and the "
                "Lloyd–Max floor with as many levels (--: not computed).", "tab:clipping-optima")
        run.write_macros("macros.tex", _macros(regime, validity, aerr))
        for metric, label in (("mse_lsb", "MSE (LSB²)"), ("bias_lsb", "bias (LSB)"),
                              ("mae_lsb", "MAE (LSB)")):
            for bits in sorted({4, 8} & set(bit_list)):
                fig = figure_regime(plt, regime, metric, label, bits)
                run.save_figure(fig, f"regime_{metric}_{bits}bit")
                plt.close(fig)
        for mode in clip_modes if clip_laws else ():
            fig = figure_clipping(plt, curves, optima, mode.value)
            run.save_figure(fig, f"clipping_{mode.value}")
            plt.close(fig)
        fig = figure_histograms(plt, samples)
        run.save_figure(fig, "error_histograms")
        plt.close(fig)
        out = run.finish()
    print(validity.to_string(index=False))
    if not clip_laws:
        print("[rounding] clipping part skipped: the uniform law has no tails to clip (add a "
              "law with tails to --laws for it)")
    print(f"[rounding] Monte Carlo outside its {100 * (1 - ALPHA):g}% CI: {n_out} of "
          f"{n_valid} comparisons (about {ALPHA * n_valid:.1f} expected by chance); "
          f"{summary['mc_outside_ci_rare_clipping']} more of {len(regime) - n_valid} where "
          "clamped values make 1% or more of the MSE and the z-interval does not apply")
    print(f"[rounding] written to {out}")
    return 0


def _untrained_baseline(seed: int):
    """(state_dict, model, identity) of the baseline's architecture untrained (seeded): the
    network of a ``--smoke`` run given no ``--checkpoint``, which measures every part on any
    machine (its numbers are no results)."""
    model = fashion_resnet(Arch.RESNET50, seed=seed).eval()
    return model.state_dict(), model, {"model": "fashion-resnet50-untrained-smoke",
                                       "seed": seed}


def _load_baseline(path: Path | None):
    """(state_dict, model or None, identity) from --checkpoint or the cached baseline.

    A qerror checkpoint gives the model too, whose activations are then measured; a bare
    state dict gives its weights only. None when neither exists.
    """
    from qerror.nn.models import (
        Arch,
        default_checkpoint_path,
        has_checkpoint_sidecar,
        load_checkpoint,
    )

    if path is None:
        for arch in (Arch.RESNET50, Arch.RESNET18):
            candidate = default_checkpoint_path(arch)
            if candidate.exists():
                path = candidate
                break
        else:
            return None
    if path.is_dir():
        raise StudyError(f"--checkpoint {path} is a folder; name a checkpoint file in it")
    if not path.is_file():
        raise StudyError(f"--checkpoint {path}: no such file")
    if has_checkpoint_sidecar(path):  # a qerror checkpoint: verified, or refused
        ckpt = load_checkpoint(path)  # a CheckpointError is study_main's refusal
        return ckpt.model.state_dict(), ckpt.model, {"path": str(path), "info": ckpt.info}
    expected = ("; pass a qerror checkpoint (python -m studies.train --checkpoint FILE) or a "
                "state dict saved by torch.save(model.state_dict(), FILE)")
    if path.stat().st_size == 0:
        raise StudyError(f"--checkpoint {path}: the file is empty{expected}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: say so, do not half-read it
        # torch's own words can be bare internals (a KeyError's '101' for a text file)
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise StudyError(f"--checkpoint {path}: not a readable torch file ({detail})"
                         f"{expected}") from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StudyError(f"--checkpoint {path}: expected a qerror checkpoint or a state dict")
    # What the weight sweep will read, checked now rather than after the other sections.
    weights = swept_weights(state)
    if not weights:
        raise StudyError(f"--checkpoint {path}: its state dict holds no conv or linear weights "
                         "(floating-point tensors of 2 or more dimensions named *weight); pass "
                         "a network's state dict or a qerror checkpoint")
    empty = [k for k, v in weights.items() if v.numel() == 0]
    if empty:
        shown = first_three([f"{k}: shape {tuple(weights[k].shape)}" for k in empty])
        raise StudyError(f"--checkpoint {path}: {len(empty)} weight tensor(s) hold no values "
                         f"({shown}); a layer without weights has no quantization error to "
                         "measure: pass a state dict without it")
    bad = [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]
    if bad:
        shown = first_three(bad)
        raise StudyError(f"--checkpoint {path}: {len(bad)} weight tensor(s) hold NaN or "
                         f"infinite values ({shown}); quantization error is not defined for "
                         "them")
    return state, None, {"path": str(path), "sha256": sha256_file(path)}


def _calibration_images(data_root, count: int, held: dict[str, int] | None = None
                        ) -> tuple[torch.Tensor, dict] | None:
    """The first ``count`` calibration images and what a manifest records of them (the
    folder read and the calibration split's sha256), or None when no data was named and
    none is found; ``held``: the held-out split sizes the network was trained beside
    (:func:`studies._common.held_out`).

    Raises
    ------
    DataNotFoundError, DataError
        A named folder (``--data-root`` or ``$QERROR_DATA``) that lacks the data, or a
        corrupt file: optional data may be skipped only when no place was named.
    """
    from qerror.data import DataNotFoundError, fashion_mnist_splits, named_data_root, to_tensor

    try:
        calib = fashion_mnist_splits(data_root, **(held or {})).calib
    except DataNotFoundError as err:
        if named_data_root(data_root) is not None:
            raise
        print(f"[rounding] activations skipped: {err}")
        return None
    identity = {"dataset": "fashion-mnist", "source": calib.source,
                "calib_sha256": calib.sha256, "calib_images_used": min(count, len(calib.labels))}
    return to_tensor(calib.images[:count]), identity


main = study_main(_main)


if __name__ == "__main__":
    raise SystemExit(main())
