"""Is round-to-nearest the best rounding for a network? Fixed rules against learned rounding.

Nearest minimises every weight's own error (ledger R5), but a network asks for the
rounding that minimises its loss. This study, on the Fashion-MNIST ResNet50 baseline and on
a small CNN trained here:

* **up or down** (:func:`qerror.nn.updown_experiment`): for the first conv and a middle
  layer, seeded stochastic roundings of that layer alone against nearest: task loss, its
  second-order Taylor estimate, the fraction that beat nearest (Wilson interval) and
  Spearman's correlation of the layer's local MSE with the loss (the MSE ranking against
  the loss ranking);
* **rounding rules**: nearest (half to even), truncation, floor, stochastic (several seeds)
  and AdaRound (:func:`qerror.nn.adaround`) for per-channel weights at 4 and 3 bits, with
  8-bit activations (round to nearest): accuracy on the whole test split with Wilson
  intervals, the paired difference from nearest with McNemar's test (Holm across every
  comparison of the run), and per-layer drift and SQNR of each through
  :func:`qerror.nn.measure` on a subset of the test split;
* **AdaRound's cost**: seconds per layer and in total, and accuracy against its iteration
  budget (the paper's 10 000 iterations per layer do not fit a 2-core CPU for ResNet50).

AdaRound runs with the paper's ``λ = 0.01``, ``β`` 20 → 2 and 20 % warm-up, but with the
learning rate scaled to the iteration budget, ``lr = 10 / iterations`` (the paper's
``1e-3 × 10 000``): Adam moves each ``V`` by about ``lr`` per step, and a choice becomes
binary only once ``|V|`` passes ``ln 11 ≈ 2.4``, so a budget of hundreds of iterations with
the paper's ``1e-3`` leaves many soft choices undecided (on the small CNN at 1000
iterations, about half of them; with ``1e-2`` almost none). The tests of
:mod:`qerror.nn.adaround` use a larger ``λ`` and ``lr`` for the same reason. summary.json
records the undecided fraction of every run.

Run: ``python -m studies.rounding_choice`` (``--smoke`` for the test suite's tiny preset).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from qerror import QuantSpec, RoundingMode
from qerror.data import (
    CALIB_IMAGES,
    VAL_IMAGES,
    ImageSet,
    fashion_mnist_splits,
    find_fashion_mnist,
    split_images,
    to_tensor,
)
from qerror.nn import (
    LAYERS,
    QuantConfig,
    TrainConfig,
    UnsupportedModelError,
    adaround,
    calibrate_activations,
    check_model,
    estimate_running_stats,
    fit,
    measure,
    middle_layer,
    quantize_weights,
    quantized_forward,
    tensor_batches,
    updown_experiment,
)
from qerror.nn.models import CheckpointError, fashion_resnet, fashion_small_cnn
from qerror.stats import holm, mcnemar_from_counts, places_for, wilson_ci
from studies._common import (
    DATA_ROOT_HELP,
    RunDir,
    StudyError,
    base_parser,
    calibration_batches,
    check_out,
    check_trained_on,
    figure_style,
    finite_float,
    given_options,
    held_out,
    int_in,
    labelled_batches,
    positive_float,
    positive_int,
    refuse_beyond_splits,
    refuse_seeds_past_64_bits,
    row_width,
    study_main,
    user_path,
)
from studies._latex import count, letters, number

ALPHA = 0.05  # level of every interval and test in this study (McNemar after Holm)
ACT_BITS = 8
FIXED = (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO, RoundingMode.FLOOR)
PAPER_LR, PAPER_ITERATIONS = 1e-3, 10_000  # Adam's lr and iterations per layer in Nagel et al.
PAPER_LR_TIMES_ITERATIONS = PAPER_LR * PAPER_ITERATIONS
LAM = 0.01  # the paper's regulariser weight
MODELS = ("resnet50", "resnet18", "small")
# AdaRound iterations per layer, headline and accuracy-vs-iterations curve, per model. The
# paper's 10 000 do not fit: one iteration over all 54 layers of ResNet50 took 1.7 s on one
# shared core of the development machine (each step touches every weight of the layer about
# twenty times: sigmoid, clamp, |2h-1|^β, their gradients, Adam), so 10 000 would take
# hours per width. The first ResNet50 run (200 per layer at 4 and 3 bits, 50 on the curve)
# took 32 min, over the 30-minute budget: its curve gave 88.58 % at 200 iterations (240 s)
# and 88.55 % at 50 (105 s), three images apart in 10 000, so the headline runs 50 and the
# curve 10 and 25, below it. Measured at 50 (two runs, adaround_cost.csv): 113-151 s at 4
# bits, 119-149 s at 3 (289 s at 200); the curve's 10 and 25 cost 77-78 s and 92-103 s (about
# 70 s of every AdaRound run is fixed cost), together more than the first curve's 50.
# ``--models resnet50 --iterations 200 --curve 50`` repeats the first ResNet50 run. The small
# CNN is cheap enough for 1000.
ITERATIONS = {"resnet50": 50, "resnet18": 50, "small": 1000}
CURVE = {"resnet50": (10, 25), "resnet18": (10, 25), "small": (50, 200, 500)}
GOAL_POINTS = 1.0  # AdaRound 4-bit within this many accuracy points of float
GOAL_MINUTES = 30.0
SITE_METRICS = ("drift_rel", "drift_rel_rms_channel_debiased", "sqnr_db", "local_sqnr_db",
                "mse", "weight_error_mean_lsb", "weight_error_mse_lsb")


@dataclass(frozen=True)
class Data:
    train: ImageSet
    calib: list[tuple[torch.Tensor, torch.Tensor]]
    test: list[tuple[torch.Tensor, torch.Tensor]]
    drift: list[tuple[torch.Tensor, torch.Tensor]]
    identity: dict


def load_data(data_root, calib_images: int, test_images: int, drift_images: int, batch: int,
              seed: int) -> Data:
    """The calibration split (ranges, AdaRound, up/down), the first ``test_images`` of the
    test split in order (accuracy), a seeded subset of them (per-layer drift), and the
    training split (the small CNN)."""
    splits = fashion_mnist_splits(data_root)
    calib = splits.calib.subset(np.arange(min(calib_images, len(splits.calib))))
    test = splits.test.subset(np.arange(min(test_images, len(splits.test))))
    pick = np.sort(np.random.default_rng(seed).permutation(len(test))[:drift_images])
    drift = test.subset(pick)
    xt, yt = to_tensor(test.images), torch.as_tensor(test.labels)
    ident = {"dataset": "fashion-mnist", "source": test.source, "test_sha256": test.sha256,
             "calib_sha256": calib.sha256, "drift_sha256": drift.sha256,
             "train_sha256": splits.train.sha256, "test_images": len(test),
             "calib_images": len(calib), "drift_images": len(drift)}
    return Data(splits.train,
                calibration_batches(to_tensor(calib.images), torch.as_tensor(calib.labels),
                                    batch),
                labelled_batches(xt, yt, batch), labelled_batches(xt[pick], yt[pick], batch),
                ident)


# --------------------------------------------------------------------------- models

def load_model(name: str, args, data: Data, progress: bool):
    """(model in eval mode, identity) for ``name``: a cached ResNet baseline (trained first
    when missing unless ``--no-train``; untrained with ``--smoke``), or the small CNN
    trained here."""
    from studies.train import get_or_train_baseline

    if name == "small":
        model = fashion_small_cnn(args.small_width, seed=args.seed)
        train = data.train.subset(np.arange(min(args.small_train_images, len(data.train))))
        x, y = to_tensor(train.images), torch.as_tensor(train.labels)
        # at least 8 steps an epoch: the one-cycle schedule's warm-up needs a few
        cfg = TrainConfig(epochs=args.small_epochs, batch_size=max(1, min(128, len(y) // 8)),
                          lr=0.1, seed=args.seed)
        res = fit(model, tensor_batches(x, y), len(y), cfg, progress=progress,
                  desc="train small")
        return res.model.eval(), {"model": "fashion-small-cnn", "width": args.small_width,
                                  "train": {"images": len(y), "epochs": cfg.epochs,
                                            "batch_size": cfg.batch_size, "lr": cfg.lr,
                                            "seed": cfg.seed}}
    if args.smoke:
        model = fashion_resnet(name, seed=args.seed)
        estimate_running_stats(model, (x for x, _ in data.calib))
        return model, {"model": f"fashion-{name}-untrained-smoke", "seed": args.seed}
    try:
        ckpt = get_or_train_baseline(name, train_if_missing=not args.no_train,
                                     data_root=args.data_root)
    except CheckpointError as err:
        raise StudyError(str(err)) from err
    check_trained_on(ckpt.info, args.data_root, use=None)
    held = held_out(ckpt.info)
    if held != {"val": VAL_IMAGES, "calib": CALIB_IMAGES}:
        # this study calibrates on the library's default held-out split
        raise StudyError(f"checkpoint {ckpt.info.path} was trained beside held-out splits of "
                         f"{held} images, not the {VAL_IMAGES} validation and "
                         f"{CALIB_IMAGES} calibration images this study holds out: some of "
                         "its calibration images could be images the network trained on. "
                         "Use a baseline trained with the default splits")
    return ckpt.model.eval(), {"model": f"fashion-{name}", "checkpoint": str(ckpt.info.path),
                               "sha256": ckpt.info.sha256, "metrics": ckpt.info.metrics}


# --------------------------------------------------------------------------- compute

def weight_spec(bits: int, mode: RoundingMode) -> QuantSpec:
    return QuantSpec(bits=bits, signed=True, symmetric=True, axis=0, rounding=mode)


ACT_SPEC = QuantSpec(bits=ACT_BITS, signed=False, symmetric=False,
                     rounding=RoundingMode.NEAREST_EVEN)


def predictions(model, batches, cfg: QuantConfig | None, act_qp, weights) -> torch.Tensor:
    """Whether each image is classified right, float (``cfg`` None) or quantized."""
    with torch.inference_mode():
        if cfg is None:
            return torch.cat([model(x).argmax(1) == y for x, y in batches])
        with quantized_forward(model, cfg, act_qp, weights=weights):
            return torch.cat([model(x).argmax(1) == y for x, y in batches])


def accuracy_rows(model_name: str, right: dict, float_right: torch.Tensor) -> list[dict]:
    """Per method: accuracy with its Wilson interval, the paired difference from float and
    from nearest at the same width with McNemar's p (adjusted later by Holm)."""
    n = int(float_right.numel())
    wf = wilson_ci(int(float_right.sum()), n, ALPHA)
    rows = [{"model": model_name, "bits": 32, "method": "float", "iterations": None,
             "images": n, "acc": wf.estimate, "acc_lo": wf.ci[0], "acc_hi": wf.ci[1]}]
    for (bits, method, iters), ok in right.items():
        w = wilson_ci(int(ok.sum()), n, ALPHA)
        row = {"model": model_name, "bits": bits, "method": method, "iterations": iters,
               "images": n, "acc": w.estimate, "acc_lo": w.ci[0], "acc_hi": w.ci[1],
               "delta_vs_float": w.estimate - wf.estimate}
        near = right[(bits, "nearest", None)] if method != "nearest" else None
        if near is not None:
            mc = mcnemar_from_counts(int((near & ~ok).sum()), int((ok & ~near).sum()), n, ALPHA)
            row.update(delta_vs_nearest=-mc.estimate, delta_lo=-mc.ci[1], delta_hi=-mc.ci[0],
                       p_vs_nearest=mc.p_value)
        rows.append(row)
    return rows


def run_model(name: str, model, args, data: Data, bits_list, bar) -> dict:
    """Everything measured on one model; frames and records keyed by output."""
    out = {"updown": [], "updown_summary": [], "sites": [], "ada_layers": [], "curve": [],
           "ada_records": [], "timing": []}
    progress = not args.no_progress
    clock = [time.perf_counter()]

    def lap(stage: str, bits=None, method=None, iterations=None):
        """One row of timing.csv: the wall seconds since the previous lap."""
        now = time.perf_counter()
        out["timing"].append({"model": name, "stage": stage, "bits": bits, "method": method,
                              "iterations": iterations, "seconds": now - clock[0]})
        clock[0] = now
    fl_layers = [next(n for n, m in model.named_modules() if isinstance(m, LAYERS)),
                 middle_layer(model)]
    fl_images = [(x[:args.fl_images], y[:args.fl_images]) for x, y in data.calib[:1]]
    for layer in dict.fromkeys(fl_layers):
        res = updown_experiment(model, layer, fl_images, bits_list[0],
                                roundings=args.fl_roundings, seed=args.seed, alpha=ALPHA,
                                progress=progress)
        place = "first" if layer == fl_layers[0] else "middle"
        out["updown"].append(res.to_frame().assign(model=name, place=place))
        out["updown_summary"].append({"model": name, "place": place, **res.summary()})
        lap(f"up or down, {place} layer", bits_list[0])
        bar.update(1)

    act_qp = calibrate_activations(model, data.calib, ACT_SPEC)
    lap("activation calibration")
    float_right = predictions(model, data.test, None, None, None)
    lap("float accuracy")
    right = {}
    iters = args.iterations if args.iterations is not None else ITERATIONS[name]
    curve = sorted(set(args.curve if args.curve is not None else CURVE[name]) - {iters})
    for bits in bits_list:
        configs = [("nearest" if m is RoundingMode.NEAREST_EVEN else m.value,
                    QuantConfig(weight_spec(bits, m), ACT_SPEC), None) for m in FIXED]
        configs += [(f"stochastic_{s}", QuantConfig(weight_spec(bits, RoundingMode.STOCHASTIC),
                                                    ACT_SPEC, seed=args.seed + s), None)
                    for s in range(args.stochastic_seeds)]
        ada_spec = QuantConfig(weight_spec(bits, RoundingMode.NEAREST_EVEN), ACT_SPEC)
        runs = [iters] + (curve if bits == bits_list[0] else [])
        for it in runs:
            configs.append(("adaround", ada_spec, it))
        for method, cfg, it in configs:
            bar.set_postfix_str(f"{name} {bits}-bit {method}"
                                + ("" if it is None else f" {it} it"))
            if method == "adaround":
                lr = args.lr if args.lr is not None else \
                    PAPER_LR_TIMES_ITERATIONS / max(int(it), 1)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                lap("other")
                ada = adaround(model, data.calib, bits, iterations=int(it), batch=32,
                               images=args.ada_images, lam=args.lam, lr=lr, seed=args.seed,
                               progress=progress)
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                weights = ada.weights
                rec = ada.record()
                soft = torch.cat([v.soft.flatten() for v in ada.layers.values()])
                undecided = float((torch.minimum(soft, 1 - soft) > 1e-3).double().mean())
                layers = rec.pop("layers")
                out["ada_records"].append({"model": name, "bits": bits, **rec,
                                           "undecided_fraction": undecided})
                out["ada_layers"] += [{"model": name, "bits": bits, "iterations": int(it),
                                       "layer": ln, **v} for ln, v in layers.items()]
                out["curve"].append({"model": name, "bits": bits, "iterations": int(it),
                                     "lr": lr, "wall_seconds": wall, "cpu_seconds": cpu,
                                     "undecided_fraction": undecided})
                lap("AdaRound", bits, method, int(it))
            else:
                weights = quantize_weights(model, cfg.weight, seed=cfg.seed)
                lap("weight quantization", bits, method, it)
            right[(bits, method, it)] = predictions(
                model, data.test, cfg, act_qp, weights)
            lap("test accuracy", bits, method, it)
            if method != "adaround" or it == iters:
                res = measure(model, data.drift, cfg, act_qp, weights=weights,
                              local_samples=min(32, args.batch_size))
                frame = res.to_frame()
                frame = frame[frame.kind.isin(["conv", "linear"])
                              & frame.metric.isin(SITE_METRICS)]
                out["sites"].append(frame.assign(model=name, bits=bits, method=method))
                lap("per-layer drift", bits, method, it)
            bar.update(1)
    out["accuracy"] = accuracy_rows(name, right, float_right)
    lap("other")
    out["iterations"] = iters
    return out


def stage_count(models, bits_list, args) -> int:
    n = 0
    for name in models:
        iters = args.iterations if args.iterations is not None else ITERATIONS[name]
        curve = set(args.curve if args.curve is not None else CURVE[name]) - {iters}
        n += 2 + len(bits_list) * (len(FIXED) + args.stochastic_seeds + 1) + len(curve)
    return n


# --------------------------------------------------------------------------- outputs

def figure_scatter(plt, ud: pd.DataFrame):
    """Task loss against the layer's local MSE (left) and against its Taylor estimate
    (right), one row per model and layer (sized for the paper's full text width);
    nearest marked."""
    keys = list(dict.fromkeys(zip(ud.model, ud.place)))
    fig, axes = plt.subplots(len(keys), 2, figsize=(6.4, 2.3 * len(keys)), squeeze=False)
    for i, (model, place) in enumerate(keys):
        d = ud[(ud.model == model) & (ud.place == place)]
        s, n = d[d.rounding == "stochastic"], d[d.rounding == "nearest"]
        for ax, xcol, xlabel in ((axes[i, 0], "local_mse", "layer's local output MSE"),
                                 (axes[i, 1], "taylor", "second-order Taylor estimate")):
            ax.plot(s[xcol], s.loss, ".", ms=4, label="stochastic")
            ax.plot(n[xcol], n.loss, "r*", ms=10, label="nearest")
            ax.axhline(float(n.loss.iloc[0]), color="r", lw=0.6, ls=":")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("task loss", fontsize=8)
            ax.tick_params(labelsize=7)
        if (d.taylor.notna()).any():
            lim = [min(d.taylor.min(), d.loss.min()), max(d.taylor.max(), d.loss.max())]
            axes[i, 1].plot(lim, lim, "k:", lw=0.7)
        axes[i, 0].set_title(f"{model}: {place} layer {d.layer.iloc[0]}, "
                             f"{int(d.bits.iloc[0])} bits", fontsize=8, loc="left")
    axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_accuracy(plt, acc: pd.DataFrame):
    models = list(dict.fromkeys(acc.model))
    fig, axes = plt.subplots(1, len(models), figsize=(row_width(len(models), 5.0), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        d = acc[(acc.model == model) & (acc.method != "float")]
        d = d[(d.method != "adaround") | d.headline]
        methods = list(dict.fromkeys(d.method))
        for j, bits in enumerate(sorted(d.bits.unique(), reverse=True)):
            db = d[d.bits == bits].set_index("method").reindex(methods)
            x = np.arange(len(methods)) + (j - 0.5) * 0.25
            ax.errorbar(x, db.acc, yerr=[db.acc - db.acc_lo, db.acc_hi - db.acc], fmt="o",
                        ms=4, capsize=2, label=f"{int(bits)}-bit weights")
        f = acc[(acc.model == model) & (acc.method == "float")].iloc[0]
        ax.axhspan(f.acc_lo, f.acc_hi, color="0.85", zorder=0, label="float (CI)")
        ax.set_xticks(range(len(methods)), methods, rotation=30, fontsize=7)
        ax.set_title(f"{model}, {ACT_BITS}-bit activations", fontsize=9)
        ax.set_ylabel(f"test accuracy ({100 * (1 - ALPHA):g}% Wilson CI)")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_curve(plt, acc: pd.DataFrame, curve: pd.DataFrame, x: str):
    """AdaRound accuracy against iterations per layer (or against seconds: a timing figure)."""
    models = list(dict.fromkeys(curve.model))
    fig, axes = plt.subplots(1, len(models), figsize=(row_width(len(models), 4.2, 0.8), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        c = curve[curve.model == model]
        bits = int(c.bits.iloc[0])
        c = c[c.bits == bits]  # the curve's width: the others' headline runs are no point of it
        a = acc[(acc.model == model) & (acc.bits == bits) & (acc.method == "adaround")]
        d = c.merge(a[["iterations", "acc", "acc_lo", "acc_hi"]], on="iterations")
        d = d.sort_values(x)
        ax.errorbar(d[x], d.acc, yerr=[d.acc - d.acc_lo, d.acc_hi - d.acc], fmt="o-", ms=4,
                    capsize=2, label=f"AdaRound {bits}-bit")
        for method, ls in (("nearest", "--"), ("float", ":")):
            r = acc[(acc.model == model) & (acc.method == method)
                    & ((acc.bits == bits) | (method == "float"))]
            ax.axhline(float(r.acc.iloc[0]), color="k", ls=ls, lw=0.8, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("iterations per layer" if x == "iterations"
                      else "AdaRound wall seconds (all layers)")
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("test accuracy")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_sqnr(plt, sites: pd.DataFrame):
    keys = list(dict.fromkeys(zip(sites.model, sites.bits)))
    fig, axes = plt.subplots(1, len(keys), figsize=(row_width(len(keys), 4.4), 3.4), squeeze=False)
    for ax, (model, bits) in zip(axes[0], keys):
        d = sites[(sites.model == model) & (sites.bits == bits) & (sites.metric == "sqnr_db")]
        for method in dict.fromkeys(d.method):
            s = d[d.method == method].sort_values("order")
            ax.plot(np.arange(len(s)), s.value, "-", lw=1, label=method)
        ax.set_title(f"{model}, {int(bits)}-bit weights", fontsize=9)
        ax.set_xlabel("conv/linear layer (execution order)")
        ax.set_ylabel("SQNR of the layer output (dB)")
    axes[0, -1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def goals(acc: pd.DataFrame, seconds: float, resnet50: bool, smoke: bool = False
          ) -> pd.DataFrame:
    """The issue's goals, each with its measured figure and whether it is met; a smoke run
    (tiny networks, a few images) judges none of them. A figure is printed with the digits
    that keep it on its goal's side (1.0033 points is "1.003", not "1.00", beside "not
    met")."""
    rows = []
    for model in dict.fromkeys(acc.model):
        d = acc[acc.model == model]
        f = float(d[d.method == "float"].acc.iloc[0])
        a = d[(d.method == "adaround") & d.headline & (d.bits == 4)]
        n = d[(d.method == "nearest") & (d.bits == 4)]
        if len(a):
            # judged on the counts of images right (each accuracy is one over the same
            # images): the difference of the float accuracies put exactly one point, 9000
            # against 8900 of 10000, at 1.0000000000000009 points, not met
            images = int(a.images.iloc[0])
            lost = round(f * images) - round(float(a.acc.iloc[0]) * images)
            gap = 100 * lost / images
            shown = places_for(gap, lambda v: v <= GOAL_POINTS, lambda k: f"{gap:.{k}f}", 2)
            rows.append({"goal": f"{model}: AdaRound 4-bit within {GOAL_POINTS:g} point of "
                                 "float", "measured": f"{gap:.{shown}f} points (nearest "
                                 f"{100 * (f - float(n.acc.iloc[0])):.2f})",
                         "met": bool(100 * lost <= GOAL_POINTS * images)})
    minutes = seconds / 60
    shown = places_for(minutes, lambda m: m <= GOAL_MINUTES, lambda k: f"{minutes:.{k}f}", 1)
    rows.append({"goal": f"whole run within {GOAL_MINUTES:g} minutes (a cached baseline; "
                         "training the small CNN included)"
                         + ("" if resnet50 else ", not the default run: ResNet50 not in it"),
                 "measured": f"{minutes:.{shown}f} min",
                 "met": bool(seconds <= 60 * GOAL_MINUTES)})
    frame = pd.DataFrame(rows)
    if smoke:
        frame["met"] = "not judged (smoke run: not evidence for any goal)"
    return frame


def macros(acc: pd.DataFrame, ud: pd.DataFrame, curve: pd.DataFrame | None = None) -> dict:
    """The numbers the paper quotes: accuracies, and the up-or-down experiment's shares,
    intervals and correlations with its weight width (``UpdownBits``, a word: the run's
    first ``--bits``); with ``curve`` (adaround_cost.csv's frame), each model's headline
    AdaRound budget and learning rate beside the paper's."""
    m = {}
    if curve is not None and len(curve):
        m["AdaroundPaperIterations"] = f"{PAPER_ITERATIONS:,}".replace(",", "{,}")
        m["AdaroundPaperLr"] = number(PAPER_LR, 1)
        headline = acc[acc.headline.astype(bool)].groupby("model").iterations.first()
        for model, it in headline.items():
            lr = curve[(curve.model == model) & (curve.iterations == it)].lr.iloc[0]
            m[f"AdaroundIterations{letters(model)}"] = f"{int(it):,}".replace(",", "{,}")
            m[f"AdaroundLr{letters(model)}"] = number(float(lr), 2)
    widths = sorted({int(b) for b in ud.bits}) if len(ud) else []
    if len(widths) > 1:
        raise ValueError(f"the up-or-down experiment runs at one width, got {widths}")
    if widths:
        m["UpdownBits"] = count(widths[0])
    for _, r in acc.iterrows():
        if r.method == "adaround" and not r.headline:
            continue
        what = "Float" if r.method == "float" else letters(f"{r.method}_{int(r.bits)}")
        m[f"Acc{letters(r.model)}{what}"] = f"{100 * r.acc:.2f}"
    for _, r in ud.iterrows():
        key = letters(f"{r.model}_{r.place}")
        m[f"Beat{key}"] = f"{100 * r.beat_fraction:.0f}"
        m[f"BeatLo{key}"] = f"{100 * r.beat_lo:.0f}"
        m[f"BeatHi{key}"] = f"{100 * r.beat_hi:.0f}"
        # undefined when every rounding gives the same loss (a constant ranks nothing)
        m[f"Rho{key}"] = (number(r.spearman_rho, 2) if np.isfinite(r.spearman_rho)
                          else "undefined")
    return m


# --------------------------------------------------------------------------- main

def _parser():
    parser = base_parser("rounding_choice", __doc__.splitlines()[0], force=True)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None,
                        help="networks: the cached ResNet baselines (trained first when "
                             "missing) and the small CNN trained here (default: resnet50 "
                             "small; smoke: small)")
    parser.add_argument("--data-root", type=user_path, default=None, help=DATA_ROOT_HELP)
    parser.add_argument("--no-train", action="store_true",
                        help="fail instead of training a missing ResNet baseline")
    parser.add_argument("--bits", nargs="+",
                        type=int_in(2, 8, "AdaRound's weight widths"), default=None,
                        help="weight bits (default 4 3; smoke 4); activations are 8-bit")
    parser.add_argument("--stochastic-seeds", type=positive_int, default=None,
                        help="stochastic roundings of the whole network (default 3, smoke 2)")
    parser.add_argument("--iterations", type=positive_int, default=None,
                        help="AdaRound iterations per layer, at least 1 (0 would be its "
                             "initial rounding, nearest, under AdaRound's name; default: "
                             "resnet50 "
                             f"{ITERATIONS['resnet50']}, small {ITERATIONS['small']}; "
                             "smoke 20)")
    parser.add_argument("--curve", nargs="*", type=positive_int, default=None,
                        help="further AdaRound iteration budgets for the accuracy-vs-"
                             "iterations curve at the first --bits (default: resnet50 "
                             f"{' '.join(map(str, CURVE['resnet50']))}, small "
                             f"{' '.join(map(str, CURVE['small']))}; smoke 5)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="AdaRound's Adam learning rate (default 10 / iterations)")
    parser.add_argument("--lam", type=_nonnegative, default=LAM,
                        help=f"AdaRound's regulariser weight (default {LAM}, the paper's)")
    parser.add_argument("--calib-images", type=int_in(1, 1000, "the calibration split"),
                        default=None, help="calibration images: activation ranges; "
                                           "AdaRound and the up/down experiment use the "
                                           "first of them (default 1000, smoke 32)")
    parser.add_argument("--ada-images", type=int_in(1, 1000, "the calibration split"),
                        default=None,
                        help="calibration images AdaRound reconstructs on, at most "
                             "--calib-images (default 512, smoke 32, or --calib-images if "
                             "fewer; the paper's 1024 would double the cost of collecting each "
                             "layer's inputs)")
    parser.add_argument("--test-images", type=positive_int, default=None,
                        help="test images for accuracy, the first of the split (default: "
                             f"all {split_images('test')}; smoke 64)")
    parser.add_argument("--drift-images", type=positive_int, default=None,
                        help="test images for the per-layer drift and SQNR, at most "
                             "--test-images (default 500, smoke 16, or --test-images if fewer)")
    parser.add_argument("--fl-roundings", type=int_in(3, 100_000, "a rank correlation needs 3"),
                        default=None,
                        help="stochastic roundings of one layer in the up/down experiment "
                             "(default 100, smoke 8)")
    parser.add_argument("--fl-images", type=positive_int, default=None,
                        help="calibration images of the up/down experiment's task loss "
                             "(default 128, smoke 16, or the first calibration batch if "
                             "smaller), at most --batch-size and --calib-images")
    parser.add_argument("--small-width", type=positive_int, default=None,
                        help="channels of the small CNN's first layer (default 16, smoke 4)")
    parser.add_argument("--small-epochs", type=positive_int, default=None,
                        help="training epochs of the small CNN (default 2, smoke 1)")
    parser.add_argument("--small-train-images", type=positive_int, default=None,
                        help="training images of the small CNN, the first of the training "
                             "split (default: all, smoke 512)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per evaluation batch (default 500, smoke 16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _nonnegative(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


def _main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    smoke = args.smoke

    def pick(value, default, small, limit=None):
        """The typed value, or the default (held to ``limit``, the option it may not exceed:
        a default above a typed limit was refused as if the user had typed it)."""
        if value is not None:
            return value
        value = small if smoke else default
        return value if limit is None else min(value, limit)

    refuse_beyond_splits(parser, {"--calib-images": (args.calib_images, "calib"),
                                  "--test-images": (args.test_images, "test")})
    models = list(dict.fromkeys(pick(args.models, ["resnet50", "small"], ["small"])))
    if "small" not in models:  # the small CNN's options would change nothing: refused
        for dest in sorted(given_options(parser, argv, args)
                           & {"small_width", "small_epochs", "small_train_images"}):
            parser.error(f"--{dest.replace('_', '-')} would change nothing: it is for the "
                         f"small CNN, and --models is {' '.join(models)}")
    bits_list = list(dict.fromkeys(pick(args.bits, [4, 3], [4])))
    args.stochastic_seeds = pick(args.stochastic_seeds, 3, 2)
    # stochastic rounding k is keyed by --seed + k (QuantConfig takes seeds up to 2**64 - 1)
    refuse_seeds_past_64_bits(parser, args.seed, args.stochastic_seeds,
                              f"--stochastic-seeds {args.stochastic_seeds}")
    args.calib_images = pick(args.calib_images, 1000, 32)
    args.ada_images = pick(args.ada_images, 512, 32, args.calib_images)
    args.test_images = pick(args.test_images, split_images("test"), 64)
    args.drift_images = pick(args.drift_images, 500, 16, args.test_images)
    args.fl_roundings = pick(args.fl_roundings, 100, 8)
    args.small_width = pick(args.small_width, 16, 4)
    args.small_epochs = pick(args.small_epochs, 2, 1)
    refuse_beyond_splits(parser, {"--small-train-images": (args.small_train_images, "train")})
    args.small_train_images = pick(args.small_train_images, split_images("train"), 512)
    args.batch_size = pick(args.batch_size, 500, 16)
    first_batch = min(args.batch_size, args.calib_images)
    args.fl_images = pick(args.fl_images, 128, 16, first_batch)
    if smoke:
        args.iterations = pick(args.iterations, None, 20)
        args.curve = pick(args.curve, None, [5])
    if args.ada_images > args.calib_images:
        parser.error(f"--ada-images {args.ada_images}: more than --calib-images "
                     f"{args.calib_images}; AdaRound uses the first calibration images")
    if args.drift_images > args.test_images:
        parser.error(f"--drift-images {args.drift_images}: more than --test-images "
                     f"{args.test_images}; the drift images are drawn from the test images")
    if args.fl_images > first_batch:
        parser.error(f"--fl-images {args.fl_images}: more than the first calibration batch "
                     f"holds ({first_batch}: the smaller of --batch-size {args.batch_size} and "
                     f"--calib-images {args.calib_images}); the up/down experiment takes its "
                     "images from that batch")
    check_out(args.out, "rounding_choice", force=args.force)
    find_fashion_mnist(args.data_root)
    started = time.perf_counter()
    data = load_data(args.data_root, args.calib_images, args.test_images, args.drift_images,
                     args.batch_size, args.seed)
    progress = not args.no_progress
    loaded = {}
    baseline_s = 0.0  # loading (or first training) the cached ResNets: not the study's time
    load_timing = [{"model": None, "stage": "data loading",
                    "seconds": time.perf_counter() - started}]
    for name in models:
        t0 = time.perf_counter()
        model, ident = load_model(name, args, data, progress)
        dt = time.perf_counter() - t0
        load_timing.append({"model": name, "stage": "training" if name == "small" else
                            "loading the baseline (not counted)", "seconds": dt})
        if name != "small":
            baseline_s += dt
        try:
            check_model(model)
        except UnsupportedModelError as err:
            raise StudyError(f"cannot run the rounding_choice study on model {name!r}: "
                             f"{err}") from err
        loaded[name] = (model, ident)
    config = {"models": models, "bits": bits_list, "activation_bits": ACT_BITS,
              "stochastic_seeds": args.stochastic_seeds,
              "iterations": {n: args.iterations if args.iterations is not None
                             else ITERATIONS[n] for n in models},
              "curve": {n: list(args.curve if args.curve is not None else CURVE[n])
                        for n in models},
              "lr": args.lr if args.lr is not None else "10 / iterations", "lam": args.lam,
              "calib_images": args.calib_images, "ada_images": args.ada_images,
              "test_images": args.test_images,
              "drift_images": args.drift_images, "fl_roundings": args.fl_roundings,
              "fl_images": args.fl_images, "small_width": args.small_width,
              "small_epochs": args.small_epochs,
              "small_train_images": args.small_train_images, "batch_size": args.batch_size,
              "alpha": ALPHA, "seed": args.seed, "smoke": smoke,
              "weight_spec": "signed symmetric per output channel, min-max",
              "activation_spec": "8-bit unsigned affine per tensor, min-max on the "
                                 "calibration images, round to nearest"}
    plt = figure_style()
    with RunDir(args.out, "rounding_choice", argv, config, force=args.force) as run:
        run.extra.update(models={n: ident for n, (_, ident) in loaded.items()},
                         data=data.identity)
        results = {}
        with tqdm(total=stage_count(models, bits_list, args), desc="rounding_choice",
                  unit="stage", disable=not progress) as bar:
            for name in models:
                results[name] = run_model(name, loaded[name][0], args, data, bits_list, bar)
        acc = pd.DataFrame([r for res in results.values() for r in res["accuracy"]])
        tested = acc.p_vs_nearest.notna()
        acc["p_holm"] = np.nan
        acc.loc[tested, "p_holm"] = holm(acc.loc[tested, "p_vs_nearest"].to_numpy())
        acc["differs"] = acc.p_holm < ALPHA
        acc["headline"] = [m == "adaround" and it == results[mod]["iterations"]
                           for m, it, mod in zip(acc.method, acc.iterations, acc.model)]
        ud = pd.concat([f for r in results.values() for f in r["updown"]], ignore_index=True)
        uds = pd.DataFrame([s for r in results.values() for s in r["updown_summary"]])
        sites = pd.concat([f for r in results.values() for f in r["sites"]], ignore_index=True)
        layers = pd.DataFrame([r for res in results.values() for r in res["ada_layers"]])
        curve = pd.DataFrame([r for res in results.values() for r in res["curve"]])
        records = [r for res in results.values() for r in res["ada_records"]]
        timing = pd.DataFrame(load_timing + [r for res in results.values()
                                             for r in res["timing"]])

        run.write_csv("accuracy.csv", acc)
        run.write_csv("updown.csv", ud)
        run.write_csv("updown_summary.csv", uds)
        run.write_csv("sites.csv", sites)
        run.write_csv("adaround_layers.csv", layers, timing=True)
        run.write_csv("adaround_cost.csv", curve, timing=True)
        run.write_csv("timing.csv", timing, timing=True)
        run.write_json("summary.json", {
            "alpha": ALPHA, "accuracy": acc.to_dict(orient="records"),
            "updown": uds.to_dict(orient="records"),
            "adaround": [{k: v for k, v in r.items()} for r in records]})
        cols = ["model", "bits", "method", "acc", "acc_lo", "acc_hi", "delta_vs_nearest",
                "p_holm"]
        table = acc[(acc.method != "adaround") | acc.headline][cols]
        run.write_latex_table(
            "accuracy.tex", table,
            f"Test accuracy with per-channel weights at each width and {ACT_BITS}-bit "
            f"activations: {100 * (1 - ALPHA):g}\\% Wilson intervals, the paired difference "
            "from round-to-nearest and McNemar's p after Holm's adjustment over every "
            "comparison.", "tab:rchoice-accuracy")
        run.write_latex_table(
            "updown.tex", uds[["model", "layer", "bits", "roundings", "nearest_loss",
                               "median_loss", "best_loss", "beat_fraction", "beat_lo",
                               "beat_hi", "spearman_rho", "spearman_p"]],
            "One layer quantized by stochastic rounding, the rest float: task loss of "
            "nearest and of the roundings, the fraction that beat nearest with its "
            f"{100 * (1 - ALPHA):g}\\% Wilson interval, and Spearman's correlation of the "
            "layer's local MSE with the loss.", "tab:rchoice-updown")
        cost = curve.assign(minutes=curve.wall_seconds / 60)[
            ["model", "bits", "iterations", "lr", "minutes", "undecided_fraction"]]
        tex = run.write_latex_table(
            "adaround_cost.tex", cost,
            "AdaRound's wall time over all layers (minutes) for each iteration budget, "
            "and the fraction of soft choices still undecided (more than $10^{-3}$ from 0 "
            "and 1) at the end.", "tab:rchoice-cost")
        run.timing_outputs.add(tex.name)
        run.write_macros("macros.tex", macros(acc, uds, curve))
        figures = [("updown_scatter", figure_scatter(plt, ud), False),
                   ("accuracy", figure_accuracy(plt, acc), False),
                   ("sqnr", figure_sqnr(plt, sites), False)]
        if len(curve):
            figures += [("curve_iterations", figure_curve(plt, acc, curve, "iterations"), False),
                        ("curve_seconds", figure_curve(plt, acc, curve, "wall_seconds"), True)]
        for stem, fig, timing in figures:
            for p in run.save_figure(fig, stem):
                if timing:
                    run.timing_outputs.add(p.name)
            plt.close(fig)
        # the goals last: the whole run's time counts the writing of every other output
        seconds = time.perf_counter() - started - baseline_s
        goal = goals(acc, seconds, "resnet50" in models, smoke=args.smoke)
        run.write_csv("goals.csv", goal, timing=True)
        tex = run.write_goals_table(
            "goals.tex", goal, "Goals of the rounding-choice study.", "tab:rchoice-goals")
        run.timing_outputs.add(tex.name)
        out = run.finish()
    _report(acc, uds, curve, out, time.perf_counter() - started)
    return 0


def _report(acc, uds, curve, out, seconds) -> None:
    shown = acc[(acc.method != "adaround") | acc.headline]
    print(shown[["model", "bits", "method", "acc", "delta_vs_nearest", "p_holm"]]
          .to_string(index=False))
    print(uds[["model", "layer", "bits", "beat_fraction", "beat_lo", "beat_hi",
               "spearman_rho", "spearman_p", "taylor_rho"]].to_string(index=False))
    if len(curve):
        print(curve.to_string(index=False))
    print(f"[rounding_choice] done in {seconds / 60:.1f} min; written to {out}")


main = study_main(_main)


if __name__ == "__main__":
    raise SystemExit(main())
