"""The bad-input table: every command line over its bad arguments and bad sources.

Each case runs a study's ``main`` in-process and asserts three things: the exit status, that
the message names the problem, and that nothing outside the study's own staging area
changed. The test builds a user's world first (a folder holding a thesis and data, data
folders good and bad, earlier runs) and compares every file and folder of it, bytes
included, afterwards; ``--out .`` and ``--out ~`` point into that folder too.

Placeholders in the arguments are filled from the world: ``{user}`` (the user's folder),
``{fm}`` (good synthetic Fashion-MNIST), ``{empty}``, ``{half}`` (2 of the 4 IDX files),
``{trunc}`` (a truncated gzip), ``{missing}`` (nothing there), ``{other_run}`` (a run of
another study), ``{prev}`` (a previous run of the same study), ``{prev_extra}`` (the same
with a user's file added), ``{new}`` (a folder that does not exist yet).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from qerror import data
from qerror.files import sha256_file
from qerror.nn.models import DEFAULT_STEM, Arch, fashion_resnet, save_checkpoint
from studies import (
    bench,
    compression,
    dataset,
    drift,
    early_exit,
    ledger,
    rounding,
    rounding_choice,
    seeds,
    train,
)

MODULES = {"drift": drift, "rounding": rounding, "dataset": dataset, "bench": bench,
           "train": train, "ledger": ledger, "seeds": seeds, "early_exit": early_exit,
           "rounding_choice": rounding_choice, "compression": compression}
# The studies of the bad-input table (the ledger has its own cases below), and those among
# them that read Fashion-MNIST.
CLI_STUDIES = ("drift", "rounding", "dataset", "bench", "train", "seeds", "early_exit",
               "rounding_choice", "compression")
READS_FASHION = ("drift", "dataset", "train", "seeds", "early_exit", "rounding_choice",
                 "compression")
ARGPARSE = 2  # argparse's status for a bad argument, also the studies' for a refused input
REFUSED = 2
SYSTEM_EXIT = 1  # SystemExit(message): Python prints the message and exits 1

# (study, case id, argv, exit status, regular expression the message must match)
# Every case gives a valid --out (a new folder) unless --out is what it tests.
OUT_CASES = [
    ("user-folder", ["--out", "{user}"], REFUSED,
     r"holds 2 entries \(sub, thesis\.tex\) and is not a run of a study"),
    ("a-file", ["--out", "{user}/thesis.tex"], REFUSED, r"is a file, not a folder"),
    ("dot", ["--out", "."], REFUSED, r"not a run of a study"),
    ("home", ["--out", "~"], REFUSED, r"not a run of a study"),
    ("under-a-file", ["--out", "{user}/thesis.tex/run"], REFUSED, r"thesis\.tex is a file"),
    ("unwritable", ["--out", "/proc/qerror-no-such-run"], REFUSED, r"cannot write in /proc"),
    ("other-study", ["--out", "{other_run}"], REFUSED, r"run of the 'ledgerish' study"),
    ("previous-run-no-force", ["--out", "{prev}"], REFUSED, r"previous run.*pass --force"),
    ("previous-run-with-user-file", ["--out", "{prev_extra}", "--force"], REFUSED,
     r"does not list \(notes\.txt\)"),
]

STUDY_CASES = {
    "drift": [
        ("headline-images-beyond-the-split", ["--headline-images", "101"], ARGPARSE,
         r"--headline-images 101: Fashion-MNIST's test split holds 100 images; give at most"),
        ("calib-images-beyond-the-split", ["--calib-images", "1001"], ARGPARSE,
         r"--calib-images 1001: Fashion-MNIST's calibration split holds 1,000 images"),
        ("fixed-images-beyond-the-split", ["--images", "101"], ARGPARSE,
         r"--images 101: Fashion-MNIST's test split holds 100 images"),
        ("weights-torchvision-name-without-data", ["--weights", "IMAGENET1K_V2"], REFUSED,
         r"--weights IMAGENET1K_V2 names torchvision's ImageNet weights.*pass --data"),
        ("images-0", ["--images", "0"], ARGPARSE,
         r"--images: must be at least 2 or 'auto', got 0"),
        ("batch-size-0", ["--batch-size", "0"], ARGPARSE, r"--batch-size: must be at least 2"),
        ("calib-images-1", ["--calib-images", "1"], ARGPARSE, r"--calib-images: must be at l"),
        ("local-samples-negative", ["--local-samples", "-1"], ARGPARSE,
         r"--local-samples: must be at least 1, got -1"),
        ("local-samples-above-batch", ["--local-samples", "17"], ARGPARSE,
         r"--local-samples 17: more than --batch-size 16"),
        ("int8-images-negative", ["--int8-images", "-3"], ARGPARSE,
         r"--int8-images: must be at least 0, got -3"),
        ("headline-images-negative", ["--headline-images", "-1"], ARGPARSE,
         r"--headline-images: must be at least 0, got -1"),
        ("images-nan", ["--images", "nan"], ARGPARSE, r"--images: expected an integer"),
        ("bits-1", ["--bits", "1"], ARGPARSE, r"--bits: must be from 2 to 16, got 1"),
        ("bits-17", ["--bits", "8", "17"], ARGPARSE, r"--bits: must be from 2 to 16, got 17"),
        ("remedy-bits-not-measured", ["--remedy-bits", "6"], ARGPARSE,
         r"--remedy-bits 6: not among --bits 8 4"),
        ("remedy-without-both", ["--targets", "weights", "--remedy-bits", "4"], ARGPARSE,
         r"remedies need --targets to include 'both'"),
        ("remedy-without-its-modes", ["--modes", "floor", "--remedy-bits", "4"], ARGPARSE,
         r"remedies need --modes to include"),
        ("unknown-mode", ["--modes", "bankers"], ARGPARSE, r"--modes: .*bankers"),
        ("seed-negative", ["--seed", "-1"], ARGPARSE,
         r"--seed: must be from 0 to 18446744073709551615, got -1"),
        ("seed-beyond-64-bits", ["--seed", str(2 ** 64)], ARGPARSE,
         r"--seed: must be from 0 to 18446744073709551615, got 18446744073709551616 "
         r"\(torch's generators take 64-bit seeds\)"),
        ("calib-curve-without-remedies", ["--calib-curve", "4", "8", "--remedy-bits"], ARGPARSE,
         r"--calib-curve: the curve refits the remedies, and this run has none"),
        ("weights-missing", ["--weights", "{missing}/model.pt"], REFUSED,
         r"missing/model\.pt"),
        ("weights-not-a-checkpoint", ["--weights", "{user}/thesis.tex"], REFUSED,
         r"thesis\.tex"),
        # the message named --checkpoint, an option drift does not have
        ("weights-a-folder", ["--weights", "{user}"], REFUSED,
         r"user is a folder, not a checkpoint file(?!.*--checkpoint)"),
        ("labels-without-data", ["--labels", "{user}/thesis.tex"], ARGPARSE,
         r"--labels: labels an ImageNet folder, so it needs --data"),
        ("unknown-device", ["--device", "tpu"], ARGPARSE,
         r"--device: device 'tpu' is not one of: cpu, cuda, auto"),
        ("calib-curve-beyond-the-split", ["--calib-curve", "4", "5000"], ARGPARSE,
         r"--calib-curve 5000: Fashion-MNIST's calibration split holds 1,000 images"),
        ("int8-images-beyond-the-measured", ["--images", "16", "--int8-images", "17"],
         ARGPARSE, r"--int8-images 17: the INT8 cross-check takes its images from the 16 "
         r"calibration images and the 16 measured test images; give at most 16"),
        ("calib-curve-with-imagenet", ["--data", "{user}", "--calib-curve", "4"], ARGPARSE,
         r"--calib-curve: the calibration curve runs on Fashion-MNIST's calibration split"),
        ("curve-images-1", ["--curve-images", "1"], ARGPARSE,
         r"--curve-images: must be at least 2, got 1"),
        ("images-word", ["--images", "many"], ARGPARSE,
         r"--images: expected an integer or 'auto', got 'many'"),
        ("pilot-without-auto", ["--pilot-images", "8"], ARGPARSE,
         r"--pilot-images: sizes the subset of --images auto only; with --images 16"),
        ("max-images-without-auto", ["--images", "30", "--max-images", "40"], ARGPARSE,
         r"--max-images: sizes the subset of --images auto only"),
        ("min-above-max", ["--images", "auto", "--min-images", "50", "--max-images", "10"],
         ARGPARSE, r"--min-images 50 is above --max-images 10"),
        ("max-images-1", ["--images", "auto", "--max-images", "1"], ARGPARSE,
         r"--max-images: must be at least 2, got 1"),
        ("auto-with-imagenet", ["--data", "{user}", "--images", "auto"], ARGPARSE,
         r"--images auto: the pilot runs on Fashion-MNIST's validation split"),
        ("pilot-with-imagenet", ["--data", "{user}", "--pilot-images", "8"], ARGPARSE,
         r"--pilot-images: sizes the subset of --images auto only; with --images 16 leave "
         r"it out(?!, or)"),
        ("max-images-beyond-the-split", ["--images", "auto", "--max-images", "20000"],
         ARGPARSE, r"--max-images 20000: Fashion-MNIST's test split holds 100 images"),
        ("pilot-beyond-the-split", ["--images", "auto", "--pilot-images", "6000"], ARGPARSE,
         r"--pilot-images 6000: Fashion-MNIST's validation split holds 5,000 images"),
    ],
    "rounding": [
        ("mc-samples-0", ["--mc-samples", "0"], ARGPARSE, r"--mc-samples: must be at least 10"),
        ("ratios-1", ["--ratios", "1"], ARGPARSE, r"--ratios: must be at least 2, got 1"),
        ("unknown-law", ["--laws", "cauchyish"], ARGPARSE, r"unknown law.*cauchyish"),
        ("seed-not-a-number", ["--seed", "one"], ARGPARSE, r"--seed: expected an integer"),
        ("checkpoint-missing", ["--checkpoint", "{missing}/model.pt"], REFUSED,
         r"missing/model\.pt: no such file"),
        ("checkpoint-not-torch", ["--checkpoint", "{user}/thesis.tex"], REFUSED,
         r"thesis\.tex: not a readable torch file"),
        # a bare state dict has weights only, so no activations to feed (a --smoke run
        # given no --checkpoint measures an untrained network, whose activations it feeds)
        ("data-root-unused", ["--checkpoint", "{statedict}", "--data-root", "{fm}"],
         ARGPARSE, r"--data-root .*needs a qerror checkpoint"),
    ],
    "dataset": [
        ("test-images-0", ["--test-images", "0"], ARGPARSE, r"--test-images: must be at least 1"),
        ("test-images-beyond-the-split", ["--test-images", "101"], ARGPARSE,
         r"--test-images 101: Fashion-MNIST's test split holds 100 images"),
        ("batch-size-0", ["--batch-size", "0"], ARGPARSE, r"--batch-size: must be at least 1"),
        ("bits-9", ["--bits", "9"], ARGPARSE,
         r"--bits: must be from 2 to 8, got 9 \(offline codes are stored one per int8 byte\)"),
        ("scale-error-nan", ["--scale-errors", "nan"], ARGPARSE,
         r"--scale-errors: must be a finite number"),
        ("scale-error-0", ["--scale-errors", "0"], ARGPARSE, r"--scale-errors must be non-zero"),
        ("checkpoint-missing", ["--checkpoint", "{missing}/model.pt"], REFUSED,
         r"missing/model\.pt"),
        ("unknown-device", ["--device", "tpu"], ARGPARSE,
         r"--device: device 'tpu' is not one of: cpu, cuda, auto"),
    ],
    "rounding_choice": [
        # stochastic rounding k is keyed by --seed + k: --seed 2**64 - 1 with the smoke's two
        # seeds passed QuantConfig's range once a model was trained and the up/down run done
        ("seed-overflows-with-stochastic-seeds", ["--seed", str(2 ** 64 - 1)], ARGPARSE,
         r"--seed 18446744073709551615 with --stochastic-seeds 2: the run takes seeds "
         r"18446744073709551615 to 18446744073709551616, .*give --seed at most "
         r"18446744073709551614"),
        ("drift-images-above-test-images", ["--test-images", "20", "--drift-images", "21"],
         ARGPARSE, r"--drift-images 21: more than --test-images 20"),
        ("small-train-images-beyond-the-split", ["--small-train-images", "101"], ARGPARSE,
         r"--small-train-images 101: Fashion-MNIST's training split holds 100 images"),
        ("test-images-beyond-the-split", ["--test-images", "101"], ARGPARSE,
         r"--test-images 101: Fashion-MNIST's test split holds 100 images"),
        ("bits-1", ["--bits", "1"], ARGPARSE,
         r"--bits: must be from 2 to 8, got 1 \(AdaRound's weight widths\)"),
        ("bits-9", ["--bits", "4", "9"], ARGPARSE, r"--bits: must be from 2 to 8, got 9"),
        # 0 iterations is AdaRound's initial rounding, nearest, under AdaRound's name
        ("iterations-0", ["--iterations", "0"], ARGPARSE,
         r"--iterations: must be at least 1, got 0"),
        ("unknown-model", ["--models", "vgg16"], ARGPARSE, r"--models: invalid choice"),
        # accepted, ignored and recorded in the manifest as used
        ("small-width-without-small", ["--models", "resnet18", "--small-width", "8"], ARGPARSE,
         r"--small-width would change nothing: it is for the small CNN, and --models is "
         r"resnet18"),
        ("fl-roundings-2", ["--fl-roundings", "2"], ARGPARSE,
         r"--fl-roundings: must be from 3 to 100000, got 2 \(a rank correlation needs 3\)"),
        ("fl-images-above-batch", ["--fl-images", "17"], ARGPARSE,
         r"--fl-images 17: more than the first calibration batch holds \(16: the smaller "
         r"of --batch-size 16 and --calib-images 32\)"),
        ("fl-images-above-calib", ["--calib-images", "4", "--ada-images", "4", "--fl-images",
                                   "16"], ARGPARSE,
         r"--fl-images 16: more than the first calibration batch holds \(4: the smaller "
         r"of --batch-size 16 and --calib-images 4\)"),
        ("calib-images-above-split", ["--calib-images", "1001"], ARGPARSE,
         r"--calib-images: must be from 1 to 1000"),
        ("ada-images-above-calib", ["--ada-images", "33"], ARGPARSE,
         r"--ada-images 33: more than --calib-images 32"),
        ("lr-0", ["--lr", "0"], ARGPARSE, r"--lr: must be above 0"),
        ("lam-negative", ["--lam", "-0.1"], ARGPARSE, r"--lam: must be at least 0"),
        ("lam-nan", ["--lam", "nan"], ARGPARSE, r"--lam: must be a finite number"),
        ("iterations-negative", ["--iterations", "-1"], ARGPARSE,
         r"--iterations: must be at least 1"),
        ("curve-0", ["--curve", "0"], ARGPARSE, r"--curve: must be at least 1"),
        ("stochastic-seeds-0", ["--stochastic-seeds", "0"], ARGPARSE,
         r"--stochastic-seeds: must be at least 1"),
    ],
    "bench": [
        ("early-exit-run-with-smoke", ["--early-exit-run", "{missing}"], ARGPARSE,
         r"--early-exit-run: --smoke times an untrained network"),
        ("pairs-0", ["--pairs", "0"], ARGPARSE, r"--pairs: must be at least 1, got 0"),
        ("unknown-group", ["--only", "everything"], ARGPARSE, r"--only: invalid choice"),
    ],
    "early_exit": [
        ("train-images-beyond-the-split", ["--train-images", "101"], ARGPARSE,
         r"--train-images 101: Fashion-MNIST's training split holds 100 images"),
        ("threshold-above-1", ["--thresholds", "0.5", "1.5"], ARGPARSE,
         r"--thresholds: must be in \[0, 1\], got '1.5'"),
        ("threshold-negative", ["--thresholds", "-0.1"], ARGPARSE,
         r"--thresholds: must be in \[0, 1\], got '-0.1'"),
        ("threshold-nan", ["--thresholds", "nan"], ARGPARSE,
         r"--thresholds: must be in \[0, 1\], got 'nan'"),
        ("select-margin-2", ["--select-margin", "2"], ARGPARSE,
         r"--select-margin: must be in \[0, 1\]"),
        ("select-margin-0-paired", ["--select", "paired-test", "--select-margin", "0"],
         ARGPARSE, r"--select-margin must be above 0 with --select paired-test"),
        ("select-margin-with-cv", ["--select-margin", "0.003"], ARGPARSE,
         r"--select-margin applies to --select paired-test and estimate; --select cv "
         r"chooses the margin from --cv-margins"),
        ("cv-margins-without-cv", ["--select", "estimate", "--cv-margins", "0.002"], ARGPARSE,
         r"--cv-margins applies to --select cv only"),
        ("cv-margin-0", ["--cv-margins", "0.005", "0"], ARGPARSE,
         r"--cv-margins must be above 0"),
        ("cv-folds-1", ["--cv-folds", "1"], ARGPARSE, r"--cv-folds: must be at least 2, got 1"),
        ("cv-folds-above-images", ["--val-images", "3"], ARGPARSE,
         r"--cv-folds 5 is more than the 3 validation images"),
        ("select-unknown", ["--select", "best"], ARGPARSE, r"--select: invalid choice"),
        ("unknown-arch", ["--arch", "vgg16"], ARGPARSE, r"--arch: .*vgg16"),
        ("train-images-1", ["--train-images", "1"], ARGPARSE,
         r"--train-images: must be at least 2, got 1"),
        ("head-epochs-0", ["--head-epochs", "0"], ARGPARSE, r"--head-epochs: must be at least 1"),
        ("lr-0", ["--lr", "0"], ARGPARSE, r"--lr: must be above 0"),
        ("joint-weights-count", ["--joint-weights", "1", "1"], ARGPARSE,
         r"--joint-weights: give one weight per exit, 4 .* got 2"),
        ("joint-variant-untrained", ["--variant", "joint", "--joint-epochs", "0"], ARGPARSE,
         r"--variant joint needs --joint-epochs of at least 1"),
        ("exit-point-unknown", ["--exit-points", "layer9"], REFUSED,
         r"--exit-points: exit point 'layer9' is not a block of this ResNet"),
        ("checkpoint-missing", ["--checkpoint", "{missing}/model.pt"], REFUSED,
         r"no checkpoint at .*missing/model\.pt"),
        ("checkpoint-other-arch", ["--arch", "resnet50", "--checkpoint", "{ckpt}"], REFUSED,
         r"valid checkpoint .* of another model: resnet18"),
        ("checkpoint-not-torch", ["--checkpoint", "{user}/thesis.tex"], REFUSED,
         r"refusing .*thesis\.tex: it is not a qerror checkpoint.*left as it is"),
    ],
    "compression": [
        ("test-images-beyond-the-split", ["--test-images", "101"], ARGPARSE,
         r"--test-images 101: Fashion-MNIST's test split holds 100 images"),
        ("dwn-luts-empty", ["--parts", "dwn", "--dwn-luts"], ARGPARSE,
         r"--dwn-luts: give at least one \(it is empty, and --parts dwn needs it\)"),
        ("wisard-budgets-empty", ["--parts", "wisard", "--wisard-budgets"], ARGPARSE,
         r"--wisard-budgets: give at least one"),
        ("early-exit-run-missing", ["--parts", "resnet", "--early-exit-run", "{missing}"],
         REFUSED, r"--early-exit-run .*missing: no finished studies\.early_exit run"),
        ("sparsity-1", ["--sparsities", "0.5", "1"], ARGPARSE,
         r"--sparsities: must be in \(0, 1\), got '1'"),
        ("sparsity-0", ["--sparsities", "0"], ARGPARSE, r"--sparsities: must be in \(0, 1\)"),
        ("sparsity-nan", ["--sparsities", "nan"], ARGPARSE, r"--sparsities: must be in"),
        ("sparsity-word", ["--sparsities", "half"], ARGPARSE,
         r"--sparsities: expected a number, got 'half'"),
        ("finetune-steps-0", ["--finetune-steps", "0"], ARGPARSE,
         r"--finetune-steps: must be at least 1, got 0"),
        ("prune-updates-above-steps", ["--prune-updates", "5"], ARGPARSE,
         r"--prune-updates 5: more than --finetune-steps 2"),
        ("address-bits-31", ["--wisard-address-bits", "31"], ARGPARSE,
         r"--wisard-address-bits: must be from 1 to 30, got 31 \(a RAM of 2\^30"),
        ("budget-too-small", ["--wisard-budgets", "100"], ARGPARSE,
         r"--wisard-budgets: must be at least 1024, got 100"),
        ("dwn-luts-not-class-groups", ["--dwn-luts", "100,55"], ARGPARSE,
         r"--dwn-luts: .*multiple of the 10 classes.*'100,55'"),
        ("dwn-luts-not-numbers", ["--dwn-luts", "many"], ARGPARSE, r"--dwn-luts: expected LUTs"),
        ("rounding-bits-16", ["--rounding-bits", "16"], ARGPARSE,
         r"--rounding-bits: must be from 2 to 8, got 16"),
        ("test-images-0", ["--test-images", "0"], ARGPARSE, r"--test-images: must be at least 1"),
        ("lr-inf", ["--finetune-lr", "inf"], ARGPARSE, r"--finetune-lr: must be a finite"),
        ("checkpoint-missing", ["--checkpoint", "{missing}/model.pt"], REFUSED,
         r"missing/model\.pt"),
    ],
    "train": [
        ("checkpoint-under-a-file", ["--checkpoint", "{user}/thesis.tex/model.pt"], REFUSED,
         r"--checkpoint .*thesis\.tex/model\.pt: .*thesis\.tex is a file"),
        ("lr-nan", ["--lr", "nan"], ARGPARSE, r"--lr: must be a finite number"),
        ("lr-0", ["--lr", "0"], ARGPARSE, r"--lr: must be above 0"),
        ("lr-inf", ["--lr", "inf"], ARGPARSE, r"--lr: must be a finite number"),
        ("epochs-0", ["--epochs", "0"], ARGPARSE, r"--epochs: must be at least 1"),
        ("batch-size-negative", ["--batch-size", "-5"], ARGPARSE, r"--batch-size: must be at"),
        ("time-budget-nan", ["--time-budget-min", "nan"], ARGPARSE,
         r"--time-budget-min: must be a finite number"),
        ("checkpoint-every-0", ["--checkpoint-every", "0"], ARGPARSE, r"--checkpoint-every: mu"),
        ("checkpoint-over-a-user-file", ["--checkpoint", "{user}/thesis.tex"], REFUSED,
         r"thesis\.tex is an existing file that is not a qerror checkpoint"),
        ("checkpoint-a-folder", ["--checkpoint", "{user}"], REFUSED, r"is a folder"),
    ],
    "seeds": [
        ("seed-overflows-with-seeds", ["--seed", str(2 ** 64 - 1), "--seeds", "2"], ARGPARSE,
         r"--seed 18446744073709551615 with --seeds 2: .*give --seed at most "
         r"18446744073709551614"),
        ("seeds-1", ["--seeds", "1"], ARGPARSE, r"--seeds: must be at least 2, got 1"),
        ("epochs-0", ["--epochs", "0"], ARGPARSE, r"--epochs: must be at least 1, got 0"),
        ("test-images-1", ["--test-images", "1"], ARGPARSE, r"--test-images: must be at least"),
        ("too-few-steps", ["--train-images", "256", "--epochs", "1"], ARGPARSE,
         r"2 steps of 128 images; the one-cycle schedule needs at least 10"),
        ("more-images-than-the-split", ["--train-images", "5000"], ARGPARSE,
         r"--train-images 5000 / --test-images 128: more than the 100 training"),
    ],
}

# Named sources that are missing, empty, incomplete or corrupt: the study must say so,
# naming the place, and never fall back to another copy.
SOURCE_CASES = [
    ("data-root-missing", ["--data-root", "{missing}"], r"missing"),
    ("data-root-empty", ["--data-root", "{empty}"], r"empty"),
    ("data-root-half", ["--data-root", "{half}"], r"t10k-images-idx3-ubyte"),
    ("data-root-truncated-gzip", ["--data-root", "{trunc}"], r"t10k-labels-idx1-ubyte\.gz"),
    ("env-missing", ["$QERROR_DATA={missing}"], r"QERROR_DATA"),
]
SOURCE_STUDIES = ("rounding", *READS_FASHION)
# What each study needs besides the case's own arguments to reach its data.
SOURCE_EXTRA = {**{study: [] for study in READS_FASHION},
                "rounding": ["--checkpoint", "{ckpt}"]}


def _table():
    rows = []
    for study in CLI_STUDIES:
        rows += [(study, f"out-{cid}", argv, code, msg) for cid, argv, code, msg in OUT_CASES]
        rows += [(study, *case) for case in STUDY_CASES[study]]
        rows += [(study, cid, argv + SOURCE_EXTRA[study], REFUSED, msg)
                 for cid, argv, msg in SOURCE_CASES if study in SOURCE_STUDIES]
    return rows


TABLE = _table()


def snapshot(root):
    """Every file and folder under ``root``: path -> bytes (None for a folder)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def world(tmp_path, fashion_idx, monkeypatch):
    """A user's folder, data folders good and bad, and earlier runs; cwd and HOME are the
    user's folder."""
    fm = fashion_idx(train=6100, test=100)
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.tex").write_text("\\documentclass{book} my thesis\n")
    (user / "sub" / "important.csv").write_text("a,b\n1,2\n")
    (tmp_path / "empty").mkdir()
    half = tmp_path / "half"
    half.mkdir()
    for name in sorted(p.name for p in fm.iterdir())[2:]:  # the two train-* files
        shutil.copy(fm / name, half / name)
    trunc = tmp_path / "trunc"
    shutil.copytree(fm, trunc)
    labels = trunc / f"{data.FILES['test'][1]}.gz"
    labels.write_bytes(labels.read_bytes()[:-12])
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "statedict.pt")
    other = tmp_path / "other_run"
    other.mkdir()
    (other / "table.csv").write_text("x\n1\n")
    (other / "manifest.json").write_text(json.dumps(
        {"study": "ledgerish", "outputs": {"table.csv": "0" * 64}}))
    places = {"user": user, "fm": fm, "empty": tmp_path / "empty", "half": half,
              "trunc": trunc, "missing": tmp_path / "missing", "other_run": other,
              "new": tmp_path / "new" / "run", "ckpt": tmp_path / "ckpt" / "model.pt",
              "statedict": tmp_path / "statedict.pt"}
    monkeypatch.chdir(user)
    monkeypatch.setenv("HOME", str(user))
    return tmp_path, places


def _previous_run(folder, study, extra=False):
    folder.mkdir(parents=True)
    (folder / "result.csv").write_text("x\n1\n")
    (folder / "manifest.json").write_text(json.dumps(
        {"study": study, "outputs": {"result.csv": sha256_file(folder / "result.csv")}}))
    if extra:
        (folder / "notes.txt").write_text("the user's own notes\n")


def run_cli(main, argv, capsys):
    """(exit status, everything printed) of ``main(argv)``, as a shell would see them."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else SYSTEM_EXIT
        message = "" if isinstance(exc.code, int) or exc.code is None else str(exc.code)
    else:
        message = ""
    out, err = capsys.readouterr()
    return code, out + err + message


@pytest.mark.parametrize("study, case, argv, code, pattern", TABLE,
                         ids=[f"{row[0]}-{row[1]}" for row in TABLE])
def test_bad_input_is_refused_with_a_message_and_changes_nothing(
        study, case, argv, code, pattern, world, monkeypatch, capsys):
    root, places = world
    places["prev"] = root / "prev" / study
    places["prev_extra"] = root / "prev_extra" / study
    _previous_run(places["prev"], study)
    _previous_run(places["prev_extra"], study, extra=True)
    if "{ckpt}" in " ".join(argv):
        _small_checkpoint(places["ckpt"])
    args = []
    for a in argv:
        if a.startswith("$QERROR_DATA="):
            monkeypatch.setenv(data.ENV_VAR, a.split("=", 1)[1].format(**places))
        else:
            args.append(a.format(**places))
    named_data = "--data-root" in args or os.environ.get(data.ENV_VAR)
    if study in READS_FASHION and not named_data:
        args += ["--data-root", str(places["fm"])]
    if "--out" not in args:
        args += ["--out", str(places["new"])]
    if study == "train":
        args += ["--arch", "resnet18"]
    before = snapshot(root)
    status, message = run_cli(MODULES[study].main, ["--smoke", *args], capsys)
    assert status == code, message
    assert re.search(pattern, message, flags=re.S), message
    assert "Traceback" not in message
    assert snapshot(root) == before


def _small_checkpoint(path):
    """A valid qerror checkpoint of a small model, for the studies that need one."""
    torch.manual_seed(0)
    save_checkpoint(fashion_resnet(Arch.RESNET18), path, arch=Arch.RESNET18, stem=DEFAULT_STEM,
                    config={}, metrics={})


LEDGER_CASES = [
    ("out-a-user-file", ["--out", "{user}/thesis.tex"], REFUSED,
     r"thesis\.tex is an existing file that this command did not write"),
    ("out-a-user-file-force", ["--out", "{user}/thesis.tex", "--force"], REFUSED,
     r"never replaced, with --force neither"),
    ("out-a-folder", ["--out", "{user}"], REFUSED, r"is a folder"),
    ("out-previous-table-no-force", ["--latex", "--out", "{table}"], REFUSED,
     r"claims table written before; pass --force"),
    ("out-under-a-file", ["--out", "{user}/thesis.tex/claims.md"], 1, r"cannot write --out"),
    ("unknown-option", ["--markdown"], ARGPARSE, r"unrecognized arguments: --markdown"),
    # accepted and ignored: the table was printed and nothing replaced
    ("force-without-out", ["--force"], ARGPARSE, r"--force replaces the file --out names"),
]


@pytest.mark.parametrize("argv, code, pattern", [c[1:] for c in LEDGER_CASES],
                         ids=[c[0] for c in LEDGER_CASES])
def test_ledger_bad_input_is_refused_and_changes_nothing(argv, code, pattern, world, capsys):
    root, places = world
    places["table"] = root / "claims.tex"
    places["table"].write_text(ledger.to_latex())
    before = snapshot(root)
    status, message = run_cli(ledger.main, [a.format(**places) for a in argv], capsys)
    assert status == code, message
    assert re.search(pattern, message, flags=re.S), message
    assert "Traceback" not in message
    assert snapshot(root) == before


def test_ledger_force_replaces_only_its_own_table(world, capsys):
    root, _ = world
    table = root / "claims.tex"
    table.write_text(ledger.to_latex().replace("Claims", "Old claims"))
    assert ledger.main(["--latex", "--out", str(table), "--force"]) == 0
    assert table.read_text() == ledger.to_latex()


# --------------------------------------------------------------------------- reruns

RERUNS = {
    "compression": (compression, [], (6100, 100)),
    "dataset": (dataset, ["--no-progress", "--scale-errors", "0.02"], (300, 200)),
    "drift": (drift, [], (6100, 100)),
    "early_exit": (early_exit, [], (6100, 100)),
    "rounding": (rounding, ["--laws", "normal", "--ratios", "2", "--mc-samples", "200"],
                 None),
    "seeds": (seeds, [], (7100, 200)),
    "rounding_choice": (rounding_choice, ["--no-progress"], (6100, 100)),
}


@pytest.mark.parametrize("study", sorted(RERUNS))
def test_a_rerun_with_the_same_seed_writes_the_same_bytes(study, fashion_idx, tmp_path):
    """Byte-identical outputs, PDFs included; the manifest differs only in its timing
    fields, and outputs that hold measured times are named in it."""
    module, extra, sizes = RERUNS[study]
    out = tmp_path / "run"
    argv = ["--smoke", "--seed", "3", "--out", str(out), "--force", *extra]
    if sizes is not None:
        argv += ["--data-root", str(fashion_idx(*sizes))]
    assert module.main(argv) == 0
    first = snapshot(out)
    assert module.main(argv) == 0
    second = snapshot(out)
    assert sorted(first) == sorted(second)
    manifests = [json.loads(run.pop("manifest.json")) for run in (first, second)]
    timing = set(manifests[0]["timing_outputs"])
    assert timing == set(manifests[1]["timing_outputs"])
    assert {name for name in first if first[name] != second[name]} <= timing
    assert any(name.endswith(".pdf") for name in first)
    for m in manifests:
        del m["started_unix"], m["seconds"]
        for name in timing:
            del m["outputs"][name]
    assert manifests[0] == manifests[1]
