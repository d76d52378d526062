"""The claims ledger: each claim of the research notes, its verdict, and the test that decides it.

The research notes (in Portuguese, kept beside the project, not in this repository; each
claim's ``notes`` field quotes their words) make claims about rounding,
truncation and their effect on a network. Every claim here is decided by a named test in
``tests/test_claims.py``; that test asserts the verdict, so a wrong verdict fails the suite.
Studies and the paper print this table; nothing in it is measured here.

Run: ``python -m studies.ledger`` prints the table in Markdown; ``--latex`` gives a booktabs
table for the paper, ``--out FILE`` writes it to a file instead.
"""

from __future__ import annotations

import argparse
import enum
import sys
from dataclasses import dataclass
from pathlib import Path

from qerror.files import atomic_write


class Verdict(enum.Enum):
    TRUE = "true"
    FALSE = "false"
    CONDITIONAL = "holds only under a condition"


@dataclass(frozen=True)
class Claim:
    id: str
    topic: str
    notes: str  # the notes' own words (Portuguese)
    english: str
    verdict: Verdict
    condition: str  # when it holds, or why it fails
    test: str  # the deciding test in tests/test_claims.py


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "R1", "rounding",
        "-1.5 → -2 (arredondamento \u201chalf away from zero\u201d no PyTorch)",
        "torch.round rounds halves away from zero.",
        Verdict.FALSE,
        "torch.round rounds halves to even: 0.5 → 0, 2.5 → 2, -2.5 → -2. The example -1.5 → -2 "
        "agrees with both rules, which is why it does not reveal the difference.",
        "test_claim_R1_torch_round_is_half_to_even",
    ),
    Claim(
        "R2", "rounding",
        "2.3 → 2 / 2.7 → 3",
        "torch.round rounds to the nearest integer.",
        Verdict.TRUE,
        "For every value that is not a tie.",
        "test_claim_R2_round_to_nearest",
    ),
    Claim(
        "R3", "rounding",
        "O erro de quantização e = q - x fica em e ∈ [−0.5, +0.5]",
        "The rounding error lies in [-0.5, 0.5] LSB.",
        Verdict.CONDITIONAL,
        "Only for values inside the representable range: a value that saturates at qmin or "
        "qmax has an error of any size.",
        "test_claim_R3_rounding_error_bound_needs_no_clipping",
    ),
    Claim(
        "R4", "rounding",
        "Então nosso erro médio ≈ 0 e não há tendência sistemática para cima ou para baixo.",
        "Round-to-nearest has mean error about 0: no systematic bias.",
        Verdict.CONDITIONAL,
        "Holds for the granular error, no value clipped, when the input law is symmetric "
        "about a grid point or about a half-integer (the bias is then exactly 0), or is wide "
        "against the step: for a normal law of standard deviation σ steps, whatever its "
        "mean, |bias| ≤ Σ_k e^(−2π²k²σ²)/(πk), whose first term e^(−2π²σ²)/π is all but "
        "2e-7 of it from σ = 1/2 on (0.0023 LSB at σ = 1/2, 8.5e-10 at σ = 1). A narrow "
        "input that sits between grid points is biased: N(0.3 s, 0.1 s) rounds to 0 almost "
        "always, a bias of about -0.3 LSB. Clipping breaks both: the signed range [-2^(b-1), "
        "2^(b-1) - 1] is not symmetric, and a law that reaches it is clamped on one side "
        "more than the other.",
        "test_claim_R4_rounding_bias_needs_a_wide_input",
    ),
    Claim(
        "R5", "rounding",
        "Arredondamento minimiza o erro quadrático médio (MSE).",
        "Rounding to nearest minimises the MSE.",
        Verdict.TRUE,
        "Pointwise: the nearest integer is the closest code to every value, so no other "
        "deterministic mode has a smaller error on any value, clipping included; MSE and MAE "
        "follow for every input law.",
        "test_claim_R5_nearest_is_pointwise_closest",
    ),
    Claim(
        "R5N", "rounding",
        "Arredondamento minimiza o erro quadrático médio (MSE).",
        "Rounding each value to nearest minimises the network's loss.",
        Verdict.FALSE,
        "Nearest minimises each weight's own error, not the loss: to second order the "
        "loss grows by gᵀΔw + ½ΔwᵀHΔw; a gradient g ≠ 0 (weights away from the loss's "
        "minimum) moves the threshold between rounding a weight down and up off the middle "
        "of its step s (by g/(Hs) of a step, for a weight of gradient g and curvature H in a "
        "separable loss), so a weight lying between the two is best rounded the other way, "
        "and the off-diagonal terms of H reward errors that cancel between weights. It "
        "holds when g = 0 and the loss is "
        "separable in the weights (diagonal H, e.g. a linear layer's output error when the "
        "inputs' second moments E[xxᵀ] are diagonal: uncorrelated and of zero mean, which a "
        "ReLU's outputs are not): then nearest is the exact optimum over all up/down "
        "choices. With correlated inputs, or with a gradient, another choice is lower, and "
        "on networks random up/down roundings of one layer often beat nearest (on the "
        "tests' small untrained network, a share of twenty whose 95 % Wilson interval lies "
        "above a quarter; its gradient is not 0: for nearest's rounding of that layer the "
        "first-order term gᵀΔw is larger than the second-order one; python -m "
        "studies.rounding_choice: the fraction with its Wilson interval on trained networks, "
        "and learned rounding, "
        "AdaRound, against nearest's accuracy).",
        "test_claim_R5N_nearest_minimises_the_loss_only_when_it_is_separable",
    ),
    Claim(
        "T1", "truncation",
        "truncamento, seria simplesmente cortar a parte decimal: 2.9 → 2 / -2.9 → -2",
        "Truncation drops the fractional part.",
        Verdict.TRUE,
        "torch.trunc and numpy.trunc round toward zero.",
        "test_claim_T1_trunc_drops_the_fraction",
    ),
    Claim(
        "T2", "truncation",
        "truncated_tensor = scaled_and_shifted_tensor.to(torch.int32)",
        "Casting to int32 is the same as torch.trunc.",
        Verdict.CONDITIONAL,
        "Equal for values inside the int32 range; outside it the cast is undefined "
        "(C++ semantics), while trunc then clamp is well defined.",
        "test_claim_T2_int_cast_truncates_in_range",
    ),
    Claim(
        "T3", "truncation",
        "Para positivos: e ∈ [−1,0]; Para negativos: e ∈ [0,1]",
        "Truncation error is in [-1, 0] for positive and [0, 1] for negative values.",
        Verdict.CONDITIONAL,
        "True of the shifted value u = x/s + z, inside the range (and the ends are open: "
        "(-1, 0] and [0, 1)). With a zero point z ≠ 0 the sign that matters is that of u, not "
        "of x: a positive x with u < 0 is rounded up.",
        "test_claim_T3_truncation_error_sign_follows_u",
    ),
    Claim(
        "T4", "truncation",
        "Truncamento tende a \u201cpuxar\u201d pesos para zero",
        "Truncation pulls weights toward zero.",
        Verdict.CONDITIONAL,
        "Only for symmetric quantization (zero point 0). With an affine zero point z it pulls "
        "every value toward the real value -z·s, so values between 0 and -z·s move away "
        "from zero.",
        "test_claim_T4_truncation_pulls_toward_minus_z_s",
    ),
)


CLAIMS += (
    Claim(
        "T5", "truncation",
        "Erro médio ≠ 0 (viés) [...] Esse viés aparece mesmo que os dados sejam "
        "“bem distribuídos”.",
        "Truncation has a non-zero mean error, even for well-distributed data.",
        Verdict.CONDITIONAL,
        "For symmetric zero-mean data and zero point 0 the mean truncation error is 0: the "
        "-1/2 LSB of positive values and +1/2 LSB of negative values cancel (the error is "
        "biased toward zero in magnitude, not in sign). For one-signed data with no mass at "
        "zero, wide against the step (the half-normal law), on a grid with zero point 0 "
        "(unsigned), the bias is about -1/2 LSB; a "
        "post-ReLU activation holds a share p0 of exact zeros, which have no error, so its "
        "bias is about -(1 - p0)/2 LSB. With a zero point z the sign that matters is that of "
        "u = x/s + z (T3): on a signed grid with zero point -128 over the same one-signed "
        "range most values have u < 0 and the bias is positive. And the truncation integer "
        "hardware performs when it requantizes an accumulator, the arithmetic right shift, "
        "is floor, not toward zero: biased by -(2^k - 1)/2^(k+1) LSB (about -1/2) even for "
        "symmetric data.",
        "test_claim_T5_truncation_bias_needs_one_signed_data",
    ),
    Claim(
        "T6", "truncation",
        "Truncamento: Aumenta o erro médio [quadrático]; Aumenta o erro absoluto médio",
        "Truncation increases the MSE and the MAE.",
        Verdict.TRUE,
        "Never smaller than round-to-nearest's, on any input. For wide inputs the MSE is close "
        "to 4× (1/3 vs 1/12 LSB²) and the MAE 2×; for inputs narrow against the step and "
        "within half a step of 0 both send almost everything to 0 and the ratio falls "
        "toward 1 (with zero point 0: with a zero point z truncation acts on u = x/s + z and "
        "sends the half of such an input that lies between 0 and -z·s a whole code away, "
        "toward -z·s, a ratio far above 4×), while a narrow input centred elsewhere can be "
        "above 4×: centred 0.7 of a "
        "step from 0 with σ = 0.05 step, (0.7² + σ²)/(0.3² + σ²), about 5.3.",
        "test_claim_T6_truncation_mse_and_mae_are_larger",
    ),
    Claim(
        "T7", "truncation",
        "Prejudica mais valores pequenos (próximos de zero)",
        "Truncation hurts small values (near zero) most.",
        Verdict.CONDITIONAL,
        "In relative error, yes (zero point 0): every value below one step in magnitude "
        "becomes 0 (100% "
        "relative error), twice the zeroed range of round-to-nearest. In absolute error, no: "
        "the error of a value in [k, k+1) steps has the same law for every k.",
        "test_claim_T7_small_values_suffer_in_relative_error_only",
    ),
)


# The network claims. Their verdicts are decided over twenty trained small networks in the
# test suite (studies.seeds) and stated for the ResNet50 baseline from the drift study's
# committed output (tests/data/baseline), which a test checks against these texts.
CLAIMS += (
    Claim(
        "N1", "network",
        "Uma camada já introduz viés; múltiplas camadas somam esse viés. Resultado: drift "
        "numérico",
        "Each layer adds a bias and the layers' biases add up: numerical drift.",
        Verdict.CONDITIONAL,
        "For the biased modes. Decided over twenty trained seeds of a ten-layer plain CNN "
        "(true labels, studies.seeds): at eight, six and four bits, truncation and floor leave "
        "a larger per-channel mean error at the deepest convolution than round-to-nearest "
        "(sampling noise removed) on most seeds (most: the share of seeds it holds on has its "
        "95 % Wilson interval above one half), and under truncation it grows with path depth "
        "(95 % bootstrap interval of the exponent above 0) on most seeds at every width; under "
        "floor it does at eight and six bits, and at four bits the seeds do not decide. Under "
        "round-to-nearest growth is not decided at any width. On the Fashion-MNIST ResNet50 "
        "baseline (studies.drift's committed run, tests/data/baseline; one network, each "
        "statement decided with the run's 200 test images random, by 95 % bootstrap intervals "
        "over them) truncation and floor leave the larger deepest drift at eight and six "
        "bits (the interval of the gap lies above 0), and at four bits round-to-nearest the "
        "larger against truncation (the interval below 0) while against floor the images do "
        "not decide (the interval holds 0; earlier trainings of the baseline gave floor's "
        "and then nearest's the larger there: at four bits the answer is the trained "
        "network's). Under truncation and floor the drift grows with path depth "
        "at eight and six bits, by the image bootstrap's interval of the exponent and by "
        "the layer bootstrap's, which is somewhat too narrow there (the fit's residuals "
        "follow each other moderately: lag-1 autocorrelation below 0.4; qerror.nn.growth); "
        "growth is shown only where both intervals lie above 0: at four bits the layer "
        "bootstrap's reaches below 0 (the image bootstrap's does not), so it is not shown "
        "there. Under round-to-nearest the image bootstrap's interval lies above 0 at every "
        "width and the layer bootstrap's at six and four bits (at eight it reaches below "
        "0), but the residuals' autocorrelation is above a half, where the layer interval "
        "is too narrow (qerror.nn.growth), so its growth is not shown.",
        "test_claim_N1_drift_grows_with_depth_for_biased_modes",
    ),
    Claim(
        "N2", "network",
        "BatchNorm / LayerNorm ficam inconsistentes",
        "BatchNorm becomes inconsistent.",
        Verdict.TRUE,
        "Under truncation and floor, at every width: on most of twenty trained seeds of a "
        "ten-layer plain CNN (studies.seeds; most: the share of seeds has its 95 % Wilson "
        "interval above one half, few: below it) the statistics of some BatchNorm's "
        "quantized input move away from "
        "those of its float input by more than a tenth: the RMS over its channels of the "
        "mean's shift in running standard deviations, or the log of the geometric mean of "
        "the variance ratio. Under round-to-nearest that happens on few seeds "
        "at eight and six bits and on most at four bits. On the ResNet50 baseline "
        "(studies.drift's committed run, tests/data/baseline; its 200 test images random, "
        "the mean shift's sampling noise removed from the figure: some BatchNorm's figure "
        "above a tenth by bounds simultaneous over the layers and the figure's two parts, "
        "every one's under it by each part's bound, both at 5 %; "
        "qerror.nn.bn.inconsistency_bounds) the same holds under truncation and floor at "
        "every width (floor at four bits without resampling: there quantization collapses "
        "some channel's variance to 0, an unbounded figure on every resample), and under "
        "round-to-nearest at six and four bits; at eight bits the images decide neither "
        "way for round-to-nearest (the largest figure on them lies above a tenth, the two "
        "bounds on either side of a tenth).",
        "test_claim_N2_batchnorm_becomes_inconsistent_under_biased_rounding",
    ),
    Claim(
        "N2L", "network",
        "BatchNorm / LayerNorm ficam inconsistentes",
        "LayerNorm becomes inconsistent.",
        Verdict.FALSE,
        "LayerNorm keeps no statistics, so there is nothing for the quantized activations to "
        "disagree with: it normalises each sample by that sample's own mean and variance. "
        "That removes exactly any error common to a sample's features (the part of "
        "truncation's bias shared by all of them) and, up to its ε, any common scale; error "
        "that differs across features passes through, divided by the sample's std.",
        "test_claim_N2L_layernorm_has_nothing_to_be_inconsistent_with",
    ),
    Claim(
        "N3", "network",
        "Saturação mais frequente; saturação em int8 acontece mais cedo",
        "Truncation makes int8 saturation more frequent and earlier.",
        Verdict.FALSE,
        "Not at the quantizer itself: on the same input, truncation clamps a subset of what "
        "round-to-nearest clamps (a value just beyond an end of the range is truncated back "
        "onto it). Not downstream either on trained networks: on twenty trained seeds of a "
        "ten-layer plain CNN (studies.seeds) truncation clamps more of the classifier's input at the top of its "
        "range than round-to-nearest on few seeds at eight, six and four bits (few: the share of "
        "seeds has its 95 % Wilson interval below one half; a seed where "
        "the two clamp equally counts as not more); among the seeds where the two differ, "
        "on fewer than half at every width, significantly fewer at four bits (the same "
        "interval below one half; at eight and "
        "six bits that depends on the seeds). It can rise only where "
        "the accumulated drift pushes activations past the range calibrated on the float "
        "network, which truncation's shrinking does not do on these networks, nor on the "
        "ResNet50 baseline (studies.drift, tests/data/baseline: no more of the classifier's "
        "input clamped at the top at any width).",
        "test_claim_N3_saturation_follows_the_drift",
    ),
    Claim(
        "N4", "network",
        "Perda de acurácia",
        "Truncation costs accuracy.",
        Verdict.TRUE,
        "Against round-to-nearest at the same width, over twenty trained seeds of a "
        "ten-layer plain CNN (studies.seeds, true labels): truncation's test accuracy is lower on average at "
        "eight, six and four bits (the mean loss's one-sided 95 % interval above 0, with "
        "the test images random as well as the seeds: qerror.stats.crossed_mean_test), "
        "and lower on most seeds at six and four bits (the share of seeds' 95 % Wilson "
        "interval above one half), where the loss is large. At eight "
        "bits the loss is small (the other one-sided interval's upper end is under two "
        "points) and some seeds gain accuracy; how many seeds lose is not decided by the "
        "test there (on these seeds most do), since a seed's loss of an image or two can "
        "change sides with another CPU's float rounding (the seeds figure of "
        "studies.seeds). On the ResNet50 "
        "baseline, eight-bit truncation of weights and activations loses about one point "
        "against round-to-nearest on the whole test split (the paired difference's 95 % "
        "interval between half a point and two points, McNemar p < 0.05; "
        "studies.drift's "
        "headline, tests/data/baseline), and tens of points at six and four bits (on the "
        "run's 200 images; the headline is eight-bit only).",
        "test_claim_N4_truncation_costs_accuracy",
    ),
)


# What truncation does to weights and activations (the notes' "efeito específico em redes
# neurais"), beside the network claims above.
CLAIMS += (
    Claim(
        "W1", "network",
        "A rede fica menos expressiva",
        "Truncating the weights makes the network less expressive.",
        Verdict.CONDITIONAL,
        "Not in what it can represent: truncation uses the same grid of codes as "
        "round-to-nearest. What it changes is where weights land, with zero point 0 (symmetric "
        "quantization, as weights usually are): the zero bin is twice as "
        "wide (|w| < s against |w| ≤ s/2), so about twice as many small weights become 0, and "
        "every other weight loses on average a little under half a step of magnitude "
        "(between 0.45 and 0.5 steps, W2). With a zero point z truncation pulls toward -z·s "
        "(T4): the bin that becomes 0 is one step wide, as round-to-nearest's, and the "
        "magnitudes between 0 and -z·s grow.",
        "test_claim_W1_truncation_keeps_the_grid_and_zeroes_twice_as_many_weights",
    ),
    Claim(
        "W2", "network",
        "Pode parecer uma regularização, mas não controlada",
        "Truncating the weights looks like regularisation, but an uncontrolled one.",
        Verdict.CONDITIONAL,
        "With zero point 0 (symmetric quantization, as weights usually are; with a zero point "
        "z truncation pulls toward -z·s instead, T4). "
        "In the mean it shrinks every weight's magnitude by about half a step whatever its "
        "size (between 0.45 and 0.5 steps from 1 to 9 steps, for weights of σ = 4 steps), as "
        "an L1 penalty's soft threshold does and unlike weight decay's shrink in proportion "
        "to the weight; but its strength is the quantization step of each channel, not a "
        "chosen coefficient, and each weight's shrink is its own fractional part, anywhere "
        "in [0, s).",
        "test_claim_W2_truncation_shrinks_by_half_a_step_whatever_the_size",
    ),
    Claim(
        "A1", "network",
        "Distribuições ficam deslocadas",
        "The activations' distributions are shifted.",
        Verdict.CONDITIONAL,
        "Their means move, under truncation and floor: at the most-shifted convolution "
        "of the tests' ten-layer network at six bits, by more than three times "
        "round-to-nearest's largest shift (relative to the float std) and well beyond its "
        "standard error (a claim read at that layer: two-sided at α = 0.001, Bonferroni over "
        "the ten convolutions). The direction is not always down: "
        "under both modes some convolutions' means move up and others down, each beyond its "
        "standard error at the same level. A convolution's output mean moves by what the "
        "rounded weights and inputs do together, which depends on their signs: at the first "
        "convolution, whose "
        "inputs (the images, of mean about 0) lose half a step on average under both modes, "
        "the mean moves by minus half that step times the rounded weights' sum: up, since "
        "that sum is negative there, and by as much as this predicts within the standard "
        "error (two-sided at α = 0.001).",
        "test_claim_A1_biased_modes_shift_the_layer_means",
    ),
)


# The dataset question (the notes' second section). python -m studies.dataset measures it on
# the Fashion-MNIST baseline; the tests below decide what can be decided exactly.
CLAIMS += (
    Claim(
        "D1", "dataset",
        "A ativação de entrada é quantizada on-the-fly, usando o scale e zero_point da "
        "primeira camada",
        "The dataset need not be quantized: the model's first quantizer quantizes float "
        "input on the fly.",
        Verdict.TRUE,
        "With the same spec, scale and zero point, a model that quantizes its float input "
        "itself and the same model fed codes stored offline see the same input values (ties "
        "between codes included) and give bit-identical outputs.",
        "test_claim_D1_input_quantizer_equals_offline_codes",
    ),
    Claim(
        "D2", "dataset",
        "Em frameworks como PyTorch/ONNX/TFLite, a entrada é FP32 e o runtime converte "
        "automaticamente para INT8",
        "The runtime converts FP32 input to INT8 automatically.",
        Verdict.CONDITIONAL,
        "Only when the converted model carries its input quantizer. In PyTorch's eager flow "
        "that is a QuantStub the user inserts: without one, the converted model's quantized "
        "convolution refuses a float tensor. PT2E inserts the quantize op itself: the "
        "converted graph takes the float input and quantizes it first. A TFLite model "
        "converted with an int8 input type expects the caller to quantize (not tested "
        "here).",
        "test_claim_D2_a_quantized_kernel_refuses_float_input",
    ),
    Claim(
        "D3", "dataset",
        "Se estamos fazendo QAT, o dataset continua em float e durante o forward pass o "
        "modelo simula quantização",
        "QAT trains on float data; the model simulates quantization in its forward pass.",
        Verdict.TRUE,
        "Fake quantization takes float input and passes a straight-through gradient inside "
        "the range (zero where a value was clamped), so a training step on float data "
        "updates the weights.",
        "test_claim_D3_qat_trains_on_float_data",
    ),
    Claim(
        "D4", "dataset",
        "Durante a calibração você passa um dataset de calibração em float e o modelo usa "
        "esses dados para estimar min/max e calcular scale e zero_point",
        "PTQ calibrates scale and zero point from float calibration data.",
        Verdict.TRUE,
        "Min-max calibration on float batches gives the scale and zero point of the exact "
        "extremes those batches reach, the data themselves untouched.",
        "test_claim_D4_ptq_calibrates_on_float_data",
    ),
    Claim(
        "D5", "dataset",
        "Nesses casos o dataset pode ser armazenado já em INT8 para economizar memória e banda",
        "Storing the dataset in INT8 saves memory and bandwidth on constrained hardware.",
        Verdict.CONDITIONAL,
        "Four times less than float32 tensors (one byte per value against four), but nothing "
        "against data that are already 8-bit, as Fashion-MNIST's pixels are on disk (uint8): "
        "their INT8 codes at the images' own size take the same bytes, and codes of the "
        "zero-padded 32×32 model input take more than the 28×28 pixels.",
        "test_claim_D5_int8_storage_saves_against_float_only",
    ),
    Claim(
        "D6", "dataset",
        "Mesmo assim, pelo que entendi, isso é uma decisão arquitetura, não de ML",
        "Storing the dataset in INT8 is an architecture decision, not an ML one.",
        Verdict.CONDITIONAL,
        "When the stored codes use the model's own scale and zero point the model sees the "
        "same input (D1), so nothing about the model changes. Codes made with another "
        "calibration (a percentile range that clips, a scale off by a few percent, or another"
        " subset whose extremes differ from the calibration set's) feed the model different "
        "input, which can change its predictions (an affine classifier fed the codes of a "
        "scale 2 % off decides some inputs otherwise): then it is an ML decision too (python "
        "-m studies.dataset counts the codes and predictions that change). On Fashion-MNIST "
        "another subset's min-max is the calibration split's: every image holds a pixel of 0 "
        "and more than nine in ten a pixel of 255; and its 99.9th percentile range is the "
        "min-max range too (more than 0.1 % of the model input's values are 255's level), so "
        "of the study's two percentile ranges only the 99th percentile's clips.",
        "test_claim_D6_other_offline_scales_change_what_the_model_sees",
    ),
)


def claim(claim_id: str) -> Claim:
    """The ledger entry with this id."""
    for c in CLAIMS:
        if c.id == claim_id:
            return c
    raise KeyError(f"no claim {claim_id!r}; known: {', '.join(c.id for c in CLAIMS)}")


# The first line of the Markdown table, an HTML comment that renders as nothing: it marks a
# file as this command's (see main's --force), where a table's header row alone would also
# mark a hand-written table of the same columns.
MARKDOWN_HEADER = "<!-- generated by python -m studies.ledger; do not edit -->\n"


def to_markdown(claims: tuple[Claim, ...] = CLAIMS) -> str:
    """The claims as a Markdown table: id, topic, claim, verdict, condition, deciding test
    (after :data:`MARKDOWN_HEADER`)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| id | topic | claim | verdict | when it holds, or why not | decided by |",
             "|---|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c.id} | {c.topic} | {cell(c.english)} | {c.verdict.value} | "
                     f"{cell(c.condition)} | `{c.test}` |")
    return MARKDOWN_HEADER + "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def _latex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


# The first line of the LaTeX table: it marks a file as this command's (see main's --force).
LATEX_HEADER = "% generated by python -m studies.ledger --latex; do not edit\n"


def to_latex(claims: tuple[Claim, ...] = CLAIMS) -> str:
    """The claims as a booktabs table (needs ``\\usepackage{booktabs}`` and a Unicode-aware
    engine or ``inputenc``/``newunicodechar`` for symbols such as → and σ)."""
    rows = [f"{c.id} & {_latex(c.english)} & {_latex(c.verdict.value)} & "
            f"{_latex(c.condition)} \\\\" for c in claims]
    return (LATEX_HEADER + "\\begin{table}[t]\n\\centering\n\\small\n"
            "\\begin{tabular}{@{}l p{0.27\\linewidth} p{0.13\\linewidth} "
            "p{0.47\\linewidth}@{}}\n\\toprule\n"
            "Id & Claim & Verdict & When it holds, or why not \\\\\n\\midrule\n"
            + "\n".join(rows) + "\n\\bottomrule\n\\end{tabular}\n"
            "\\caption{Claims of the research notes and their verdicts; each is decided by "
            "a named test in \\texttt{tests/test\\_claims.py}.}\n"
            "\\label{tab:claims}\n\\end{table}\n")


def main(argv: list[str] | None = None) -> int:
    """Print (or write) the claims table; ``--help`` lists the arguments."""
    parser = argparse.ArgumentParser(prog="python -m studies.ledger",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--latex", action="store_true",
                        help="a booktabs LaTeX table for the paper (default: Markdown)")
    parser.add_argument("--out", type=lambda text: Path(text).expanduser(), default=None,
                        help="write the table to this new file (atomically) instead of "
                             "printing it")
    parser.add_argument("--force", action="store_true",
                        help="replace --out when it is a table this command wrote before")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.force and args.out is None:
        parser.error("--force replaces the file --out names; without --out the table is "
                     "printed and nothing is replaced")
    table = to_latex() if args.latex else to_markdown()
    if args.out is None:
        sys.stdout.write(table)
        return 0
    problem = _out_problem(args.out.expanduser(), args.force)
    if problem:
        print(f"[ledger] error: {problem}", file=sys.stderr)
        return 2
    try:
        atomic_write(args.out.expanduser(), lambda tmp: tmp.write_text(table, encoding="utf-8"))
    except OSError as err:
        print(f"[ledger] error: cannot write --out {args.out}: {err}", file=sys.stderr)
        return 1
    print(f"[ledger] {len(CLAIMS)} claims written to {args.out}")
    return 0


def _out_problem(out: Path, force: bool) -> str | None:
    """Why ``out`` may not receive the table, or None.

    A new file may; a table this command wrote (its first line is one of the two headers,
    :data:`MARKDOWN_HEADER` or :data:`LATEX_HEADER`) may with ``force``; nothing else is
    ever replaced.
    """
    if out.is_dir():
        return (f"--out {out} is a folder; pass the name of a new file, e.g. "
                f"--out {out / 'claims.md'}")
    if not out.exists():
        return None
    try:
        with out.open(encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        first = ""
    if first not in (MARKDOWN_HEADER, LATEX_HEADER):
        return (f"--out {out} is an existing file that this command did not write; it is never "
                "replaced, with --force neither. Pass the name of a new file")
    if not force:
        return (f"--out {out} holds a claims table written before; pass --force to replace it, "
                "or another --out")
    return None


if __name__ == "__main__":
    raise SystemExit(main())
