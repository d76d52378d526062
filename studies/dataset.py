"""Must the dataset be quantized? An input quantizer inside the model against offline INT8 data.

The research notes ask whether a quantized model needs a quantized dataset. Three parts
answer with measurements on the Fashion-MNIST baseline and its test split (10,000 images),
each written as tidy data, figures and LaTeX tables:

1. Equivalence. A model whose first op is an INT8 input quantizer (affine, min-max scale and
   zero point from the calibration split, round half to even) fed float images, against the
   same model without it fed images quantized offline to int8 codes with the same scale and
   zero point and dequantized on load: the logits agree bit for bit. Then what changes when
   the offline scale and zero point are not the model's (another calibration subset, a
   percentile range; with ``--scale-errors``, a scale off by a given fraction): the model
   requantizes data already quantized once, and the study counts the codes that change, the
   double-quantization error, the logit differences and the accuracy. Fashion-MNIST pixels
   are uint8 already: the study also checks, pixel level by pixel level, whether the
   calibrated quantizer keeps all 256 levels apart and how far it moves them.
2. Storage. Bytes of float32, float16, uint8, int8 and packed int4 copies of Fashion-MNIST
   (28×28 and the padded 1×32×32 model input) and of ImageNet-size images (3×224×224: one
   image, the 50,000-image validation set, the 1,281,167-image training set), computed from
   shapes and element sizes and checked against arrays the run holds; and the in-memory cost
   of turning one batch of each stored form into the float32 model input, as ratios timed
   alternately in one run.
3. Rounding mode of offline quantization. The test split quantized offline at 8 and 4 bits
   with each rounding mode (scale and zero point from the calibration split only), the
   baseline's accuracy with Wilson intervals, and McNemar tests of each mode against the
   float input and against round-half-to-even at the same width (Holm-adjusted).

An image whose model input is bit-identical to one already evaluated is not run through the
network again: its logits are the ones computed for that input (the network in evaluation
mode is a function of its input). The tidy data say how many images each configuration ran.

Run: ``python -m studies.dataset`` (the run's wall time is its manifest's ``seconds``; the
paper's record, ``paper/record/dataset``, has the one it was made with; ``--smoke`` for the
test suite's tiny preset, a small untrained CNN on a few hundred images).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from qerror import (
    MAX_CODE_BITS,
    InputQuantizer,
    QParams,
    QuantSpec,
    RangeMethod,
    RangePolicy,
    RoundingMode,
    calibrate,
    dequantize,
    holm,
    mcnemar_test,
    on_codes,
    quantize,
    quantize_offline,
    wilson_ci,
    with_input_quantizer,
)
from qerror import data as qdata
from qerror.compress import StorageFormat, held_bytes, storage_bytes
from qerror.nn import model_device
from qerror.nn.training import Device, DeviceError, disable_tf32, resolve_device
from studies._common import (
    DATA_ROOT_HELP,
    RunDir,
    StudyError,
    base_parser,
    check_out,
    check_trained_on,
    figure_style,
    finite_float,
    given_options,
    held_out,
    holm_columns,
    int_in,
    paired_ratio,
    positive_int,
    refuse_beyond_splits,
    row_width,
    study_main,
    user_path,
)
from studies._latex import letters

ALPHA = 0.05  # level of every interval (Wilson, McNemar's CI) and of every test in this study
# The model's input quantizer: signed 8-bit codes, affine (the normalized input is not
# centred on 0), one scale per tensor.
INT8 = QuantSpec(bits=8, signed=True, symmetric=False)
MAX_BITS = MAX_CODE_BITS  # offline codes are stored one per byte (int8)
DEFAULT_MODES = (RoundingMode.NEAREST_EVEN, RoundingMode.NEAREST_AWAY, RoundingMode.TOWARD_ZERO)
DEFAULT_BITS = (8, 4)
# Scale errors cost a pass over the test split each; another subset's 99th-percentile range
# (a scale 2% off and a zero point one code off) is in the default run already.
DEFAULT_SCALE_ERRORS: tuple[float, ...] = ()
PERCENTILES = (99.9, 99.0)  # percentile ranges of the "another calibration" variants
LEVELS = 256  # uint8 pixel levels
# ILSVRC2012 (ImageNet-1k): images in the validation and training sets, and the input shape
# of torchvision's evaluation preprocessing (centre crop 224, after resizing the short side).
IMAGENET_VAL, IMAGENET_TRAIN, IMAGENET_SHAPE = 50_000, 1_281_167, (3, 224, 224)


# --------------------------------------------------------------------------- arguments


# --bits: offline codes are stored one per int8 byte, so 2 to MAX_BITS.
_offline_bits = int_in(2, MAX_BITS, "offline codes are stored one per int8 byte")


# --------------------------------------------------------------------------- models


def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int, desc: str,
            progress: bool = True) -> torch.Tensor:
    """Logits (N, classes) of ``model`` in evaluation mode, batch by batch."""
    model.eval()
    device = model_device(model)
    outs = []
    with torch.inference_mode(), tqdm(total=len(inputs), desc=desc, unit="img",
                                      disable=not progress, leave=False) as bar:
        for lo in range(0, len(inputs), batch_size):
            outs.append(model(inputs[lo:lo + batch_size].to(device)).float().cpu())
            bar.update(min(batch_size, len(inputs) - lo))
    return torch.cat(outs)


class LogitCache:
    """Logits of one network keyed by the bytes of each image's input.

    An input seen before is not run again; its logits are those already computed. Keys are
    the raw bytes (not the values), so only bit-identical inputs share logits.
    """

    def __init__(self, net: nn.Module, batch_size: int, progress: bool = True):
        self.net, self.batch_size, self.progress = net.eval(), batch_size, progress
        self._store: dict[bytes, torch.Tensor] = {}

    @staticmethod
    def keys(inputs: torch.Tensor) -> list[bytes]:
        flat = inputs.detach().contiguous().view(len(inputs), -1).numpy()
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]

    @staticmethod
    def digest(inputs: torch.Tensor) -> bytes:
        """One key for a whole batch of inputs: equal only for bit-identical batches."""
        return hashlib.blake2b(inputs.detach().contiguous().numpy().tobytes(),
                               digest_size=16).digest()

    def seed(self, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        """Remember logits computed elsewhere for these inputs."""
        for key, row in zip(self.keys(inputs), logits):
            self._store[key] = row

    def __call__(self, inputs: torch.Tensor, desc: str) -> tuple[torch.Tensor, int]:
        """Logits (N, classes) and how many images had to be run."""
        keys = self.keys(inputs)
        missing = list({k: i for i, k in enumerate(keys) if k not in self._store}.values())
        if missing:
            logits = predict(self.net, inputs[missing], self.batch_size, desc, self.progress)
            for i, row in zip(missing, logits):
                self._store[keys[i]] = row
        return torch.stack([self._store[k] for k in keys]), len(missing)


# --------------------------------------------------------------------------- part 1


def equivalence(net: nn.Module, x: torch.Tensor, qparams: QParams, float_logits: torch.Tensor,
                batch_size: int, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """The model with an input quantizer on float images against the model on offline codes.

    Returns a tidy frame (comparison, metric, value) and the logits, codes and model
    inputs of both paths.
    """
    codes = quantize_offline(x, INT8, qparams)
    model_q, model_c = with_input_quantizer(net, INT8, qparams), on_codes(net, INT8, qparams)
    # the input each network actually receives: the output of its first module
    seen: dict[str, list] = {"q": [], "c": []}
    hooks = [model_q[0].register_forward_hook(lambda m, a, out: seen["q"].append(out.cpu())),
             model_c[0].register_forward_hook(lambda m, a, out: seen["c"].append(out.cpu()))]
    try:
        logits_q = predict(model_q, x, batch_size, "input quantizer in the model", progress)
        logits_c = predict(model_c, codes, batch_size, "offline int8 codes", progress)
    finally:
        for h in hooks:
            h.remove()
    input_q, input_c = torch.cat(seen["q"]), torch.cat(seen["c"])
    rows = []

    def add(comparison, a, b, in_a=None, in_b=None):
        diff = (a - b).abs()
        metrics = {"images": len(a), "logit_elements": a.numel(),
                   "differing_logit_elements": int((a != b).sum()),
                   "max_abs_logit_diff": float(diff.max()),
                   "mean_abs_logit_diff": float(diff.mean()),
                   "differing_predictions": int((a.argmax(1) != b.argmax(1)).sum())}
        if in_a is not None:
            metrics["differing_input_elements"] = int((in_a != in_b).sum())
            metrics["input_elements"] = in_a.numel()
        rows.extend({"comparison": comparison, "metric": k, "value": v}
                    for k, v in metrics.items())

    add("quantizer_in_model_vs_offline_codes", logits_q, logits_c, input_q, input_c)
    add("quantizer_in_model_vs_float_input", logits_q, float_logits, input_q, x)
    return pd.DataFrame(rows), {"logits_q": logits_q, "logits_c": logits_c, "codes": codes,
                                "input": input_c}


def pixel_level_values() -> torch.Tensor:
    """The 256 normalized pixel levels (256,), float32, computed by the data path itself."""
    img = np.broadcast_to(np.arange(LEVELS, dtype=np.uint8)[:, None, None], (LEVELS, 28, 28))
    return qdata.to_tensor(img)[:, 0, 16, 16].clone()


def pixel_levels(qparams_by_bits: dict[int, QParams], test_pixels: np.ndarray) -> pd.DataFrame:
    """Code and error in LSB of every pixel level, per deterministic mode and bit width.

    ``test_pixels`` (N, 28, 28) uint8 gives each level's count in the test split (padding
    not counted). ``grid_code`` is the code ``pixel + qmin`` that keeps the uint8 levels as
    they are (8 bits only); ``clipped`` marks levels whose rounded value lies outside the
    integer range.
    """
    levels = pixel_level_values()
    counts = np.bincount(test_pixels.reshape(-1), minlength=LEVELS)
    k = np.arange(LEVELS)
    rows = []
    for bits, qp in qparams_by_bits.items():
        spec = INT8.replace(bits=bits)
        for mode in RoundingMode:
            if mode.is_random:
                continue  # a stochastic code is not a function of the pixel level
            codes = quantize(levels, spec.replace(rounding=mode), qp.scale, qp.zero_point)
            # the same scale and zero point with a range too wide to clamp: the rounded value
            wide = quantize(levels, spec.replace(bits=16, rounding=mode), qp.scale,
                            qp.zero_point)
            deq = dequantize(codes, qp.scale, qp.zero_point)
            err = (deq.double() - levels.double()).numpy() / qp.scale
            rows.append(pd.DataFrame({
                "bits": bits, "mode": mode.value, "pixel": k, "value": levels.numpy(),
                "code": codes.numpy(), "grid_code": k + spec.qmin if bits == 8 else np.nan,
                "error_lsb": err, "clipped": ((wide < spec.qmin) | (wide > spec.qmax)).numpy(),
                "test_count": counts}))
    return pd.concat(rows, ignore_index=True)


def exact_ties(values, qparams: QParams) -> int:
    """How many of ``values`` (float32) sit exactly half-way between two codes: ``x/s + z``
    a half-integer in exact rational arithmetic (the scale rounded to float32, as the
    quantizer takes it). Round-half-to-even and round-half-away differ at those whose
    half-away code is odd (all, none or some of them: not half in general)."""
    s = Fraction(float(np.float32(qparams.scale)))
    z = Fraction(int(qparams.zero_point))
    return sum((Fraction(float(v)) / s + z).denominator == 2
               for v in np.asarray(values, dtype=np.float32))


def pixel_summary(levels: pd.DataFrame, qparams_by_bits: dict[int, QParams]) -> pd.DataFrame:
    """Per bit width and mode: are the 256 levels kept apart, and how far are they moved.

    Bias and MSE are weighted by each level's count among the test pixels. ``ties`` counts
    levels whose shifted value is exactly half-way between codes (:func:`exact_ties`),
    where the nearest modes' tie rules decide.
    """
    out = []
    for bits, g in levels.groupby("bits", sort=False):
        by_mode = {m: d.sort_values("pixel") for m, d in g.groupby("mode", sort=False)}
        ties = exact_ties(by_mode["nearest_even"].value.to_numpy(), qparams_by_bits[bits])
        for mode, d in by_mode.items():
            w = d.test_count.to_numpy(dtype=float)
            e = d.error_lsb.to_numpy()
            off = (np.nan if bits != 8 else
                   float(w[d.code.to_numpy() != d.grid_code.to_numpy()].sum() / w.sum()))
            distinct = int(d.code.nunique())
            out.append({"bits": bits, "mode": mode, "distinct_codes": distinct,
                        "merged_levels": LEVELS - distinct, "lossless": distinct == LEVELS,
                        "error_free": bool(np.all(e == 0)), "ties": ties,
                        "clipped_levels": int(d.clipped.sum()),
                        "min_error_lsb": float(e.min()), "max_error_lsb": float(e.max()),
                        "bias_lsb": float(np.dot(w, e) / w.sum()),
                        "mse_lsb": float(np.dot(w, e * e) / w.sum()),
                        "frac_test_pixels_off_grid": off})
    return pd.DataFrame(out)


@dataclass(frozen=True)
class OfflineParams:
    """Scale and zero point an offline quantization of the data used, and how they came."""

    name: str
    how: str
    qparams: QParams


def scale_variant(err: float) -> str:
    """The name of the variant whose scale is the model's times ``1 + err``."""
    return f"scale_{100 * err:+g}pct"


def offline_params(model_qp: QParams, other: torch.Tensor,
                   scale_errors) -> list[OfflineParams]:
    """The model's own parameters, calibrations on another subset, and scale errors."""
    out = [OfflineParams("model", "the model's own (calibration split, min-max)", model_qp),
           OfflineParams("other_minmax", "another subset, min-max", calibrate(other, INT8))]
    for p in PERCENTILES:
        policy = RangePolicy(RangeMethod.PERCENTILE, percentile=p)
        out.append(OfflineParams(f"other_p{p:g}", f"another subset, {p:g}th percentile range",
                                 calibrate(other, INT8, policy)))
    for err in scale_errors:
        out.append(OfflineParams(scale_variant(err),
                                 f"the model's scale times {1 + err:g}, its zero point",
                                 QParams(model_qp.scale * (1 + err), model_qp.zero_point)))
    return out


def double_quantization(cache: LogitCache, x: torch.Tensor, labels: torch.Tensor,
                        model_qp: QParams, variants: list[OfflineParams],
                        single_logits: torch.Tensor) -> pd.DataFrame:
    """Data quantized offline with each variant's parameters, loaded, and requantized by
    the model's input quantizer, against the model quantizing the float data once.

    Errors are in LSB of the model's scale; logit differences and the McNemar test are
    against the single quantization. A variant whose requantized codes are the single
    quantization's (the model's own parameters by construction; on Fashion-MNIST another
    subset's min-max too) is a check, outside Holm's family (NaN adjusted p); one whose
    codes are an earlier variant's repeats that test and takes its adjusted p
    (``same_test_as``).
    """
    s, z = model_qp.scale, model_qp.zero_point
    q_single = quantize(x, INT8, s, z)
    e_single = (dequantize(q_single, s, z).double() - x.double()) / s
    single_correct = (single_logits.argmax(1) == labels).numpy()
    quantizer = InputQuantizer(INT8, model_qp)
    first_with = {LogitCache.digest(q_single): None}  # None: the single quantization
    rows = []
    for v in variants:
        codes, sat = quantize(x, INT8, v.qparams.scale, v.qparams.zero_point,
                              return_saturation=True)
        loaded = dequantize(codes.to(torch.int8), v.qparams.scale, v.qparams.zero_point)
        q_double = quantize(loaded, INT8, s, z)
        twin = first_with.setdefault(LogitCache.digest(q_double), v.name)
        with torch.inference_mode():
            net_input = quantizer(loaded)
        logits, ran = cache(net_input, f"offline {v.name}, requantized")
        e_double = (net_input.double() - x.double()) / s
        changed = q_double != q_single
        correct = (logits.argmax(1) == labels).numpy()
        acc = wilson_ci(int(correct.sum()), len(correct), ALPHA)
        test = mcnemar_test(correct, single_correct, ALPHA)
        diff = (logits - single_logits).abs()
        rows.append({
            "variant": v.name, "how": v.how, "offline_scale": float(v.qparams.scale),
            "offline_zero_point": int(v.qparams.zero_point), "model_scale": float(s),
            "model_zero_point": int(z), "scale_ratio": float(v.qparams.scale) / float(s),
            "offline_clipped_frac": float((sat.low + sat.high) / sat.total),
            "frac_codes_changed": float(changed.float().mean()),
            "frac_images_changed": float(changed.view(len(x), -1).any(1).float().mean()),
            "distinct_codes": int(q_double.unique().numel()),
            "single_bias_lsb": float(e_single.mean()),
            "single_mse_lsb": float((e_single ** 2).mean()),
            "double_bias_lsb": float(e_double.mean()),
            "double_mse_lsb": float((e_double ** 2).mean()),
            "double_max_abs_error_lsb": float(e_double.abs().max()),
            "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "differing_logit_elements": int((logits != single_logits).sum()),
            "prediction_changes": int((logits.argmax(1) != single_logits.argmax(1)).sum()),
            "n": len(correct), "correct": int(correct.sum()), "accuracy": acc.estimate,
            "ci_low": acc.ci[0], "ci_high": acc.ci[1], "diff_vs_single": test.estimate,
            "mcnemar_p": test.p_value, "mcnemar_method": test.method,
            "in_family": twin == v.name,
            "same_test_as": "" if twin in (None, v.name) else twin,
            "images_evaluated": ran})
    frame = pd.DataFrame(rows)
    # Codes equal to the single quantization's (the model's own parameters, by construction)
    # make a check, not a test, left out of the family (each made the family one larger, and
    # every adjusted p larger with it); its adjusted p is NaN. A repeat of an earlier
    # variant's codes is that variant's test again.
    frame = holm_columns(frame, ["mcnemar_p"], frame.in_family)
    copies = frame.same_test_as != ""
    if copies.any():
        frame.loc[copies, "mcnemar_p_holm"] = frame.same_test_as[copies].map(
            dict(zip(frame.variant, frame.mcnemar_p_holm)))
    frame["differs"] = frame.mcnemar_p_holm < ALPHA
    return frame


# --------------------------------------------------------------------------- part 2


def storage_sets() -> list[tuple]:
    """(dataset, split, images, layout name, shape per image) of every data set measured."""
    sizes = dict(qdata.SIZES)
    sizes["train+test"] = sizes["train"] + sizes["test"]
    out = []
    for layout, shape in (("28x28 pixels", (28, 28)), ("1x32x32 model input", (1, 32, 32))):
        out += [("Fashion-MNIST", split, n, layout, shape) for split, n in sizes.items()]
    layout = "x".join(map(str, IMAGENET_SHAPE)) + " model input"
    out += [("ImageNet", split, n, layout, IMAGENET_SHAPE)
            for split, n in (("one image", 1), ("val", IMAGENET_VAL), ("train", IMAGENET_TRAIN))]
    return out


def storage_table(measured: dict[tuple[str, str], float] | None = None) -> pd.DataFrame:
    """Bytes of every data set in every format, from shapes and element sizes.

    ``measured`` maps (layout, format) to the bytes per image of an array the run holds;
    it is set beside the computed figure for the rows it covers.
    """
    measured = measured or {}
    rows = []
    for dataset, split, images, layout, shape in storage_sets():
        elements = int(np.prod(shape))
        f32 = storage_bytes(StorageFormat.FLOAT32, images * elements)
        for fmt in StorageFormat:
            nbytes = storage_bytes(fmt, images * elements)
            rows.append({"dataset": dataset, "split": split, "images": images,
                         "layout": layout, "elements_per_image": elements, "format": fmt.label,
                         "bits_per_element": fmt.bits, "bytes_per_image": elements * fmt.bits / 8,
                         "bytes": nbytes, "MiB": nbytes / 2**20, "GiB": nbytes / 2**30,
                         "ratio_to_float32": nbytes / f32,
                         "measured_bytes_per_image": measured.get((layout, fmt.label), np.nan)})
    return pd.DataFrame(rows)


def measured_sizes(pixels: np.ndarray, x: torch.Tensor, codes: torch.Tensor
                   ) -> dict[tuple[str, str], float]:
    """Bytes per image of the arrays this run holds, in each stored form."""
    n = len(pixels)
    padded = np.pad(pixels, ((0, 0), (2, 2), (2, 2)))[:, None]
    arrays = {("28x28 pixels", "uint8"): held_bytes(pixels),
              ("1x32x32 model input", "uint8"): held_bytes(padded),
              ("1x32x32 model input", "float32"): held_bytes(x),
              ("1x32x32 model input", "float16"): held_bytes(x.half()),
              ("1x32x32 model input", "int8"): held_bytes(codes)}
    return {k: v / n for k, v in arrays.items()}


def conversion_throughput(pixels: np.ndarray, x: torch.Tensor, codes: torch.Tensor,
                          qparams: QParams, batch: int, pairs: int,
                          progress: bool = True) -> pd.DataFrame:
    """Time to turn one stored batch into the float32 model input, against copying a
    float32 batch, timed alternately in one run (median of per-pair ratios; a progress bar
    over the pairs where ``progress``).

    In memory only: neither disk nor bus transfer is measured.
    """
    px = np.ascontiguousarray(pixels[:batch])
    f32 = x[:batch].clone()
    f16 = f32.half()
    c8 = codes[:batch].clone()
    s, z = qparams.scale, qparams.zero_point
    candidates = {
        "float16 1x32x32, to float32": (lambda: f16.float(), f16.numel() * 2),
        "uint8 28x28 pixels, pad and normalize": (lambda: qdata.to_tensor(px), px.nbytes),
        "int8 codes 1x32x32, dequantize": (lambda: dequantize(c8, s, z), c8.numel()),
    }
    rows = []
    for name, (func, nbytes) in candidates.items():
        ratios, ta, tb = paired_ratio(func, f32.clone, pairs, progress=progress)
        rows.append({"stored_as": name, "baseline": "float32 1x32x32, copy",
                     "images": len(f32), "stored_bytes": nbytes,
                     "baseline_bytes": f32.numel() * 4,
                     "ratio_median": float(np.median(ratios)), "ratio_min": float(ratios.min()),
                     "ratio_max": float(ratios.max()), "candidate_ms": float(np.median(ta) * 1e3),
                     "baseline_ms": float(np.median(tb) * 1e3), "pairs": pairs})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- part 3


def _accuracy_row(config, mode, bits, correct, logits, float_logits, ran, qp=None,
                  error_lsb=None, codes=None):
    acc = wilson_ci(int(correct.sum()), len(correct), ALPHA)
    diff = (logits - float_logits).abs()
    row = {"config": config, "mode": mode, "bits": bits, "n": len(correct),
           "correct": int(correct.sum()), "accuracy": acc.estimate, "ci_low": acc.ci[0],
           "ci_high": acc.ci[1], "scale": np.nan, "zero_point": np.nan,
           "input_bias_lsb": np.nan, "input_mse_lsb": np.nan, "input_max_abs_error_lsb": np.nan,
           "distinct_codes": np.nan, "max_abs_logit_diff_vs_float": float(diff.max()),
           "mean_abs_logit_diff_vs_float": float(diff.mean()),
           "agreement_with_float": float((logits.argmax(1) == float_logits.argmax(1))
                                         .float().mean()),
           "images_evaluated": ran}
    if qp is not None:
        row.update({"scale": float(qp.scale), "zero_point": int(qp.zero_point),
                    "input_bias_lsb": float(error_lsb.mean()),
                    "input_mse_lsb": float((error_lsb ** 2).mean()),
                    "input_max_abs_error_lsb": float(error_lsb.abs().max()),
                    "distinct_codes": int(codes.unique().numel())})
    return row


def offline_rounding(cache: LogitCache, x: torch.Tensor, labels: torch.Tensor,
                     calib: torch.Tensor, modes, bit_list, float_logits: torch.Tensor,
                     float_ran: int, seed: int
                     ) -> tuple[pd.DataFrame, pd.DataFrame, dict[int, QParams]]:
    """Accuracy on test images quantized offline with each mode and width, and McNemar tests.

    Scale and zero point come from the calibration split (min-max, affine, signed codes);
    the baseline is fed the dequantized codes. Returns the accuracy frame (one row per
    configuration, the float input first), the McNemar frame (each configuration against the
    float input, and each mode against round-half-to-even at its width) and the parameters
    per width.

    Configurations whose model input is bit-identical (round-half-away gives
    round-half-to-even's codes where no value is a tie) are one classifier on these images:
    a comparison of a pair of inputs already compared is the same test on the same data,
    and takes the adjusted p of the first (``same_test_as`` names it); a comparison of two
    identical inputs (no discordant image) is a check, outside the family, with a NaN
    adjusted p. Holm's adjustment runs over the distinct tests only (``in_family``): each
    copy counted again made every adjusted p larger.
    """
    labels_np = labels.numpy()
    float_correct = float_logits.argmax(1).numpy() == labels_np
    rows = [_accuracy_row("float32", "none", 32, float_correct, float_logits, float_logits,
                          float_ran)]
    correct_by = {"float32": float_correct}
    # which configurations feed the network the same input: the first of each
    same_input = {"float32": "float32"}
    first_with = {LogitCache.digest(x): "float32"}
    qparams = {}
    pairs = []
    for bits in bit_list:
        qp = calibrate(calib, INT8.replace(bits=bits))
        qparams[bits] = qp
        for mode in modes:
            config = f"{mode.value}@{bits}"
            codes = quantize_offline(x, INT8.replace(bits=bits, rounding=mode), qp, seed=seed)
            net_input = dequantize(codes, qp.scale, qp.zero_point)
            logits, ran = cache(net_input, f"offline {config}")
            err = (net_input.double() - x.double()) / qp.scale
            correct = logits.argmax(1).numpy() == labels_np
            correct_by[config] = correct
            same_input[config] = first_with.setdefault(LogitCache.digest(net_input), config)
            rows.append(_accuracy_row(config, mode.value, bits, correct, logits, float_logits,
                                      ran, qp, err, codes))
            pairs.append((config, "float32"))
            if mode is not RoundingMode.NEAREST_EVEN and RoundingMode.NEAREST_EVEN in modes:
                pairs.append((config, f"nearest_even@{bits}"))
    tests = []
    first_test: dict[tuple[str, str], str] = {}
    for a, b in pairs:
        t = mcnemar_test(correct_by[a], correct_by[b], ALPHA)
        key = (same_input[a], same_input[b])
        check = key[0] == key[1]
        name = first_test.setdefault(key, f"{a} vs {b}")
        tests.append({"config": a, "versus": b, "only_config": t.only_a, "only_versus": t.only_b,
                      "n": t.n, "diff": t.estimate, "ci_low": t.ci[0], "ci_high": t.ci[1],
                      "statistic": t.statistic, "p_value": t.p_value, "method": t.method,
                      "in_family": not check and name == f"{a} vs {b}",
                      "same_test_as": "" if check or name == f"{a} vs {b}" else name})
    mcnemar = pd.DataFrame(tests, columns=["config", "versus", "only_config", "only_versus", "n",
                                           "diff", "ci_low", "ci_high", "statistic", "p_value",
                                           "method", "in_family", "same_test_as"])
    mcnemar["p_holm"] = np.nan
    family = mcnemar.in_family.to_numpy(bool)
    mcnemar.loc[family, "p_holm"] = holm(mcnemar.p_value.to_numpy()[family])
    adjusted = dict(zip(mcnemar.config + " vs " + mcnemar.versus, mcnemar.p_holm))
    copies = mcnemar.same_test_as != ""
    if copies.any():
        mcnemar.loc[copies, "p_holm"] = mcnemar.same_test_as[copies].map(adjusted)
    mcnemar["differs"] = mcnemar.p_holm < ALPHA
    return pd.DataFrame(rows), mcnemar, qparams


# --------------------------------------------------------------------------- figures


def figure_accuracy(plt, acc: pd.DataFrame):
    flt = acc[acc.config == "float32"].iloc[0]
    offline = acc[acc.config != "float32"]
    bit_list = sorted(offline.bits.unique(), reverse=True)
    fig, axes = plt.subplots(1, len(bit_list), figsize=(row_width(len(bit_list), 3.2, 0.85), 2.8), sharey=True,
                             squeeze=False)
    for ax, bits in zip(axes[0], bit_list):
        d = offline[offline.bits == bits].reset_index(drop=True)
        ax.axhspan(100 * flt.ci_low, 100 * flt.ci_high, color="0.85", zorder=0)
        ax.axhline(100 * flt.accuracy, color="0.4", lw=0.8, label="float32 input")
        ax.errorbar(np.arange(len(d)), 100 * d.accuracy,
                    yerr=[100 * (d.accuracy - d.ci_low), 100 * (d.ci_high - d.accuracy)],
                    fmt="o", ms=4, capsize=3, color="C0", label="offline codes")
        ax.set_xticks(np.arange(len(d)), [m.replace("_", " ") for m in d["mode"]], rotation=30,
                      ha="right", fontsize=7)
        ax.set_title(f"{bits}-bit offline input", fontsize=8)
    axes[0][0].set_ylabel(f"test accuracy (%), {100 * (1 - ALPHA):g}% Wilson CI")
    axes[0][-1].legend(fontsize=6, frameon=False)
    fig.tight_layout()
    return fig


def figure_pixel_error(plt, levels: pd.DataFrame):
    bit_list = sorted(levels.bits.unique(), reverse=True)
    fig, axes = plt.subplots(1, len(bit_list), figsize=(row_width(len(bit_list), 3.4, 0.85), 2.8), squeeze=False)
    styles = ("-", "--", ":", "-.", (0, (1, 3)))
    for ax, bits in zip(axes[0], bit_list):
        d = levels[levels.bits == bits]
        for i, (mode, g) in enumerate(d.groupby("mode", sort=False)):
            # Modes that give the same codes draw on top of each other: the line styles
            # keep each visible.
            ax.step(g.pixel, g.error_lsb, where="mid", color=f"C{i}", lw=1.0,
                    ls=styles[i % len(styles)], label=mode.replace("_", " "))
        ax.set_xlabel("pixel level (uint8)")
        ax.set_title(f"{bits} bits", fontsize=8)
    axes[0][0].set_ylabel("error x̂ − x (LSB)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=7, frameon=False)
    fig.suptitle("Offline quantization error of each pixel level (calibration-split range)",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def figure_storage(plt, storage: pd.DataFrame):
    keep = storage[storage.split.isin(["train+test", "val", "train"])
                   & ~((storage.dataset == "Fashion-MNIST") & (storage.split == "train"))]
    keep = keep.assign(label=keep.dataset + " " + keep.split + "\n" + keep.layout)
    labels = list(dict.fromkeys(keep.label))
    formats = list(dict.fromkeys(keep.format))
    fig, ax = plt.subplots(figsize=(6.0, 0.5 + 0.55 * len(labels)))
    height = 0.8 / len(formats)
    for j, fmt in enumerate(formats):
        d = keep[keep.format == fmt].set_index("label").loc[labels]
        y = np.arange(len(labels)) + j * height
        ax.barh(y, d.bytes, height=height, color=f"C{j}", label=fmt)
        for yi, b in zip(y, d.bytes):
            ax.text(b * 1.1, yi, _human(b), va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(right=ax.get_xlim()[1] * 8)
    ax.set_yticks(np.arange(len(labels)) + 0.4 - height / 2, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bytes (from shape × element size)")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def _human(nbytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"


def figure_variants(plt, variants: pd.DataFrame):
    names = [n.replace("_", " ") for n in variants.variant]
    y = np.arange(len(variants))
    fig, axes = plt.subplots(1, 3, figsize=(9.0, 0.8 + 0.35 * len(variants)), sharey=True)
    axes[0].barh(y, 100 * variants.frac_codes_changed, color="C0")
    axes[0].set_xlabel("model codes changed (%)")
    axes[1].barh(y, variants.max_abs_logit_diff, color="C1")
    axes[1].set_xlabel("max |Δ logit| vs one quantization")
    axes[2].errorbar(100 * variants.accuracy, y,
                     xerr=[100 * (variants.accuracy - variants.ci_low),
                           100 * (variants.ci_high - variants.accuracy)],
                     fmt="o", ms=4, capsize=3, color="C2")
    axes[2].set_xlabel(f"accuracy (%), {100 * (1 - ALPHA):g}% CI")
    axes[0].set_yticks(y, names, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("Offline codes with other parameters, requantized by the model's INT8 input "
                 "quantizer", fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- main


def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}"


def _macros(equiv, pixels, variants, acc, mcnemar, storage) -> dict[str, str]:
    """Numbers the paper's text quotes, under letter-only names."""
    eq = equiv[equiv.comparison == "quantizer_in_model_vs_offline_codes"].set_index("metric").value
    m = {"TestImages": f"{int(eq['images']):,}",
         "EquivLogitElements": f"{int(eq['logit_elements']):,}",
         "EquivDifferingLogits": f"{int(eq['differing_logit_elements'])}",
         "EquivMaxAbsLogitDiff": f"{eq['max_abs_logit_diff']:.3g}",
         "EquivDifferingInputs": f"{int(eq['differing_input_elements'])}"}
    for r in acc.itertuples():
        key = "FloatInput" if r.config == "float32" else letters(f"{r.mode}_{r.bits}")
        m[f"Accuracy{key}"] = _pct(r.accuracy)
        m[f"CILow{key}"] = _pct(r.ci_low)
        m[f"CIHigh{key}"] = _pct(r.ci_high)
        if r.config != "float32":
            m[f"InputBiasLsb{key}"] = f"{r.input_bias_lsb:.3f}"
    for r in mcnemar.itertuples():
        if not np.isfinite(r.p_holm):
            continue  # a check of two identical inputs: no test
        versus = "Float" if r.versus == "float32" else "Nearest"
        m[f"P{letters(r.config.replace('@', '_'))}Vs{versus}"] = f"{r.p_holm:.2g}"
    for r in pixels.itertuples():
        m[f"DistinctCodes{letters(f'{r.mode}_{r.bits}')}"] = str(int(r.distinct_codes))
        # the 28x28 pixels' bias (weighted by the test pixels), the pixel table's column
        m[f"PixelBiasLsb{letters(f'{r.mode}_{r.bits}')}"] = f"{r.bias_lsb:.3f}"
    eight = pixels[(pixels.bits == 8) & (pixels["mode"] == "nearest_even")]
    if len(eight):
        m["PixelOffsetLsb"] = f"{eight.bias_lsb.iloc[0]:.3f}"
    for r in variants.itertuples():
        key = letters(r.variant)
        m[f"CodesChanged{key}"] = _pct(r.frac_codes_changed)
        m[f"PredictionChanges{key}"] = str(int(r.prediction_changes))
    imnet = storage[(storage.dataset == "ImageNet") & (storage.split != "one image")]
    for r in imnet.itertuples():
        if r.format in ("float32", "uint8"):
            m[f"Imagenet{letters(r.split)}{letters(r.format)}GiB"] = f"{r.GiB:.1f}"
    return m


def build_parser():
    parser = base_parser("dataset", __doc__.splitlines()[0], force=True)
    parser.add_argument("--checkpoint", type=user_path, default=None,
                        help="a qerror checkpoint to evaluate (default: the cached ResNet50 "
                             "baseline; with --smoke, a small untrained CNN)")
    parser.add_argument("--train-if-missing", action=argparse.BooleanOptionalAction, default=True,
                        help="train the baseline (about half an hour on 2 cores) when it is "
                             "not in the cache (default: yes)")
    parser.add_argument("--data-root", type=user_path, default=None, help=DATA_ROOT_HELP)
    parser.add_argument("--download", action="store_true",
                        help="download Fashion-MNIST if it is not found")
    parser.add_argument("--modes", nargs="+", type=RoundingMode.parse, default=None,
                        help="rounding modes of the offline quantization (default: "
                             + " ".join(m.value for m in DEFAULT_MODES) + ")")
    parser.add_argument("--bits", nargs="+", type=_offline_bits, default=None,
                        help="widths of the offline codes, 2 to 8 (default: 8 4)")
    parser.add_argument("--scale-errors", nargs="*", type=finite_float, default=None,
                        help="relative errors of the offline scale against the model's, "
                             "e.g. 0.02 -0.05 (default: none)")
    parser.add_argument("--test-images", type=positive_int, default=None,
                        help="test images used (default: all; smoke 200)")
    parser.add_argument("--batch-size", type=positive_int, default=256,
                        help="inference batch size (default 256)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    parser.add_argument("--device", type=Device.parse, default=Device.CPU,
                        help="where the network runs: cpu (default), cuda or auto (cuda where "
                             "a GPU is found); the manifest names the one used")
    return parser


def smoke_net(seed: int) -> nn.Module:
    """A small untrained CNN for 1×32×32 input and 10 classes (the smoke preset's model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.BatchNorm2d(8),
                             nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)).eval()


def _load_network(args):
    """(network, identity, split settings) from --checkpoint, the cache, or the smoke preset."""
    if args.checkpoint is None and args.smoke:
        return (smoke_net(args.seed), {"arch": "smoke CNN", "weights": "untrained",
                                       "init_seed": args.seed},
                {"val": 100, "calib": 100})
    from qerror.nn.models import (
        FASHION_CLASSES,
        default_checkpoint_path,
        load_checkpoint,
        retrain_command,
    )
    from studies.train import get_or_train_baseline

    # A refused checkpoint is a CheckpointError, which study_main reports as a refusal.
    if args.checkpoint is not None:
        ckpt = load_checkpoint(args.checkpoint, expected_num_classes=FASHION_CLASSES)
    else:
        path = default_checkpoint_path("resnet50")
        if not path.exists():
            if not args.train_if_missing:
                raise StudyError(f"no trained baseline at {path}. Train it with "
                                 f"`{retrain_command('resnet50')}` (about half an hour on "
                                 "2 CPU cores) or pass --checkpoint PATH.")
            print(f"[dataset] no trained baseline at {path}: training it now with "
                  f"`{retrain_command('resnet50')}`. That takes about half an hour on 2 CPU "
                  "cores (the training study prints its own estimate after timing its first "
                  "steps, and resumes if interrupted); this study follows.", flush=True)
        ckpt = get_or_train_baseline("resnet50", train_if_missing=args.train_if_missing,
                                     data_root=args.data_root, download=args.download)
    check_trained_on(ckpt.info, args.data_root, download=args.download)
    identity = {"arch": ckpt.info.arch.value, "stem": ckpt.info.stem.value,
                "checkpoint": str(ckpt.info.path), "sha256": ckpt.info.sha256,
                "metrics": ckpt.info.metrics}
    # the held-out images of its training (split seed 0, whatever its training seed)
    return ckpt.model, identity, held_out(ckpt.info)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = list(dict.fromkeys(args.modes or DEFAULT_MODES))
    bit_list = list(dict.fromkeys(args.bits or DEFAULT_BITS))
    scale_errors = list(dict.fromkeys(DEFAULT_SCALE_ERRORS if args.scale_errors is None
                                      else args.scale_errors))
    if any(not -1.0 < e < 10.0 or e == 0.0 for e in scale_errors):
        parser.error("--scale-errors must be non-zero and within (-1, 10)")
    named: dict[str, float] = {}
    for e in scale_errors:
        if named.setdefault(scale_variant(e), e) != e:
            # one name for two rows: tables, summary and macros could not tell them apart
            parser.error(f"--scale-errors {named[scale_variant(e)]!r} and {e!r} are the same "
                         f"to six significant digits (both {scale_variant(e)}); give values "
                         "that differ within them")
    if "train_if_missing" in given_options(parser, argv, args) and (
            args.checkpoint is not None or args.smoke):
        # the network is --checkpoint's or the smoke preset's: nothing is ever trained
        parser.error("--train-if-missing/--no-train-if-missing would change nothing: it is "
                     "for the cached baseline, and this run's network is "
                     + ("--checkpoint's" if args.checkpoint is not None
                        else "the smoke preset's untrained CNN") + "; leave it out")
    refuse_beyond_splits(parser, {"--test-images": (args.test_images, "test")})
    n_test = args.test_images if args.test_images is not None else (200 if args.smoke else None)
    try:
        device = resolve_device(args.device)
    except DeviceError as err:
        raise StudyError(f"--device {args.device.value}: {err}") from err
    check_out(args.out, "dataset", force=args.force)

    if not args.download:
        # Data first: a missing data set is reported before any model is trained.
        try:
            qdata.find_fashion_mnist(args.data_root)
        except qdata.DataNotFoundError as err:
            print(f"[dataset] error: {err}", file=sys.stderr)
            return 2
    net, model_identity, split = _load_network(args)
    try:
        splits = qdata.fashion_mnist_splits(args.data_root, **split, download=args.download)
    except (qdata.DataNotFoundError, ValueError) as err:
        print(f"[dataset] error: {err}", file=sys.stderr)
        return 2
    net = net.eval().to(device, memory_format=torch.channels_last)
    precision = disable_tf32() if device.type == "cuda" else {}
    test = splits.test if n_test is None else splits.test.subset(
        np.arange(min(n_test, len(splits.test))))
    calib_x = qdata.to_tensor(splits.calib.images)
    other = splits.val.subset(np.arange(min(len(splits.calib), len(splits.val))))
    other_x = qdata.to_tensor(other.images)
    x = qdata.to_tensor(test.images)
    labels = torch.from_numpy(test.labels)
    data_identity = {"source": test.source, "test_sha256": test.sha256,
                     "calib_sha256": splits.calib.sha256, "other_sha256": other.sha256,
                     "split": split}
    config = {"modes": [m.value for m in modes], "bits": bit_list, "scale_errors": scale_errors,
              "percentiles": list(PERCENTILES), "test_images": len(test),
              "calib_images": len(splits.calib), "other_images": len(other),
              "batch_size": args.batch_size, "alpha": ALPHA, "input_spec": INT8,
              "seed": args.seed, "smoke": args.smoke, "device": device.type, **precision,
              "torch_threads": torch.get_num_threads()}
    plt = figure_style()
    with RunDir(args.out, "dataset", argv, config, force=args.force) as run:
        run.extra = {"model": model_identity, "data": data_identity}
        model_qp = calibrate(calib_x, INT8)
        cache = LogitCache(net, args.batch_size, args.progress)
        float_logits, float_ran = cache(x, "float input")
        equiv, paths = equivalence(net, x, model_qp, float_logits, args.batch_size,
                                   args.progress)
        cache.seed(paths["input"], paths["logits_c"])
        variants = double_quantization(cache, x, labels, model_qp,
                                       offline_params(model_qp, other_x, scale_errors),
                                       paths["logits_q"])
        acc, mcnemar, qparams = offline_rounding(cache, x, labels, calib_x, modes, bit_list,
                                                 float_logits, float_ran, args.seed)
        levels = pixel_levels(qparams, test.images)
        pixels = pixel_summary(levels, qparams)
        storage = storage_table(measured_sizes(test.images, x, paths["codes"]))
        throughput = conversion_throughput(test.images, x, paths["codes"], model_qp,
                                           args.batch_size, 3 if args.smoke else 15,
                                           args.progress)

        run.write_csv("equivalence.csv", equiv)
        run.write_csv("offline_variants.csv", variants)
        run.write_csv("accuracy.csv", acc)
        run.write_csv("mcnemar.csv", mcnemar)
        run.write_csv("pixel_levels.csv", levels)
        run.write_csv("pixel_summary.csv", pixels)
        run.write_csv("storage.csv", storage)
        run.write_csv("throughput.csv", throughput, timing=True)
        eq = equiv[equiv.comparison == "quantizer_in_model_vs_offline_codes"] \
            .set_index("metric").value
        summary = {
            "equivalence": {k: float(v) for k, v in eq.items()},
            "bit_exact": bool(eq["differing_logit_elements"] == 0),
            "model_input_qparams": {"scale": model_qp.scale, "zero_point": model_qp.zero_point},
            "accuracy": {r.config: {"accuracy": r.accuracy, "ci": [r.ci_low, r.ci_high],
                                    "images_evaluated": int(r.images_evaluated)}
                         for r in acc.itertuples()},
            "mcnemar": [{"config": r.config, "versus": r.versus, "diff": r.diff,
                         "p": r.p_value, "p_holm": r.p_holm, "differs": bool(r.differs)}
                        for r in mcnemar.itertuples()],
            "pixels": pixels.to_dict(orient="records"),
            "variants": variants[["variant", "frac_codes_changed", "max_abs_logit_diff",
                                  "prediction_changes", "accuracy", "mcnemar_p_holm"]]
            .to_dict(orient="records"),
            "alpha": ALPHA,
        }
        run.write_json("summary.json", summary)
        run.write_macros("macros.tex", _macros(equiv, pixels, variants, acc, mcnemar, storage))
        run.write_latex_table(
            "equivalence.tex", equiv.pivot(index="metric", columns="comparison", values="value")
            .reset_index(),
            "Input quantizer inside the model against offline int8 codes dequantized on load "
            "(test split).", "tab:dataset-equivalence", float_format="%.6g")
        run.write_latex_table(
            "offline_variants.tex",
            variants[["variant", "scale_ratio", "offline_zero_point", "frac_codes_changed",
                      "double_mse_lsb", "max_abs_logit_diff", "prediction_changes", "accuracy",
                      "mcnemar_p_holm"]],
            "Offline codes with parameters other than the model's, requantized by its INT8 "
            "input quantizer; differences against one quantization of the float input. "
            "McNemar's p is Holm-adjusted over the variants whose codes differ from it, each "
            "set of codes once (none where they are the same).",
            "tab:dataset-variants")
        table = acc[["config", "accuracy", "ci_low", "ci_high", "input_bias_lsb",
                     "input_mse_lsb", "distinct_codes", "agreement_with_float"]]
        run.write_latex_table(
            "accuracy.tex", table,
            f"Test accuracy with offline-quantized input, {100 * (1 - ALPHA):g}\\% Wilson "
            "intervals; scale and zero point from the calibration split.", "tab:dataset-accuracy")
        run.write_latex_table(
            "mcnemar.tex", mcnemar[["config", "versus", "only_config", "only_versus", "diff",
                                    "p_value", "p_holm"]],
            f"McNemar tests (Holm-adjusted over the distinct tests, α = {ALPHA:g}; a "
            "configuration whose input is bit-identical to another's repeats that one's test, "
            "and against it is a check with no adjusted p).",
            "tab:dataset-mcnemar")
        run.write_latex_table(
            "pixel_summary.tex",
            pixels[["bits", "mode", "distinct_codes", "clipped_levels", "min_error_lsb",
                    "max_error_lsb", "bias_lsb", "frac_test_pixels_off_grid"]],
            "Offline quantization of the 256 pixel levels (bias weighted by test pixels).",
            "tab:dataset-pixels")
        st = storage[storage.split.isin(["one image", "train+test", "val", "train"])
                     & ~((storage.dataset == "Fashion-MNIST") & (storage.split == "train"))]
        run.write_latex_table(
            "storage.tex", st[["dataset", "split", "layout", "format", "bytes", "MiB",
                               "ratio_to_float32"]],
            "Storage from shape × element size.", "tab:dataset-storage")
        for stem, fig in (("accuracy_by_mode", figure_accuracy(plt, acc)),
                          ("pixel_error", figure_pixel_error(plt, levels)),
                          ("storage", figure_storage(plt, storage)),
                          ("offline_variants", figure_variants(plt, variants))):
            run.save_figure(fig, stem)
            plt.close(fig)
        out = run.finish()
    _report(eq, acc, mcnemar, pixels, variants, out)
    return 0


def _report(eq, acc, mcnemar, pixels, variants, out) -> None:
    print(f"[dataset] input quantizer in the model vs offline int8 codes: "
          f"{int(eq['differing_logit_elements'])} of {int(eq['logit_elements'])} logits differ, "
          f"max |Δ| = {eq['max_abs_logit_diff']:g}")
    print(acc[["config", "accuracy", "ci_low", "ci_high", "input_bias_lsb",
               "images_evaluated"]].to_string(index=False))
    print(mcnemar[["config", "versus", "only_config", "only_versus", "p_value", "p_holm"]]
          .to_string(index=False))
    print(pixels[["bits", "mode", "distinct_codes", "max_error_lsb", "bias_lsb",
                  "frac_test_pixels_off_grid"]].to_string(index=False))
    print(variants[["variant", "scale_ratio", "frac_codes_changed", "max_abs_logit_diff",
                    "prediction_changes", "accuracy", "mcnemar_p_holm",
                    "images_evaluated"]].to_string(index=False))
    print(f"[dataset] written to {out}")


main = study_main(_main)


if __name__ == "__main__":
    raise SystemExit(main())
