"""The README's measured figures, rendered from the runs that measured them.

A passage of ``README.md`` that reports what a run measured sits between two markers,

    <!-- record: NAME -->
    ...
    <!-- /record -->

and is written by the renderer ``NAME`` here (:data:`RENDERERS`) from *records*: folders
``paper/record/<run>/`` holding a copy of a finished run's ``manifest.json``, copies of the
outputs the passage reads (each must match the sha256 its manifest gives it, so a record is
what the study wrote, not a number typed in), and ``record.json``, the words a manifest
cannot know (the command line as run, checked against the manifest's study and
``argv``, the machine and what else ran on it).

``python paper/readme.py`` rewrites the passages in place, and writes nothing when a
passage or a record is not sound; ``--check`` changes nothing and exits 1 naming every
passage that differs from its rendering and every record that does not match its manifest
(``tests/studies/test_readme.py`` runs the same check). ``--add NAME=RUN FILE ...`` copies a
finished run's manifest and the named outputs into ``paper/record/NAME``, replacing that
record whole only once the copies check out (a new record gets a ``record.json`` to
complete; a replaced one keeps its own, with a warning when the new run's commit or machine
differs), then render. A record's run is of a commit of this repository.

A setting the prose states (a test's level, a power: the code's, not a run's) sits inline,
``<!-- setting: NAME -->VALUE<!-- /setting -->``, and is written from the study's constant
(:data:`SETTINGS`); ``--check`` names every one that differs from it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torchvision
from scipy.optimize import brentq
from scipy.stats import norm

# Run as a script, this file's own checkout supplies qerror and studies, not the one the
# environment installed in editable mode (another checkout's git_identity would name its
# commit in the provenance).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qerror.files import atomic_write, sha256_file
from qerror.nn import QuantConfig
from qerror.nn.seeds import bn_moments_bytes
from qerror.stats import median_ranks, places_for, wilson_ci
from studies._common import STAGING_MARK, is_smoke_run, manifest_shape
from studies._latex import NOT_A_NUMBER, count, signed
from studies.compression import ALPHA as COMPRESSION_ALPHA
from studies.compression import point_estimates_note
from studies.drift import RESOLVE_POWER as DRIFT_RESOLVE_POWER
from studies.drift import TAIL_TOP as DRIFT_TAIL_TOP
from studies.drift import (
    imagenet_pixel_bytes,
    kept_means_bytes,
    pilot_local_samples,
    resampled_bytes,
)
from studies.early_exit import ALPHA as EARLY_EXIT_ALPHA

PAPER = Path(__file__).resolve().parent
REPO = PAPER.parent
RECORDS = PAPER / "record"
README = REPO / "README.md"

_BLOCK = re.compile(r"(<!-- record: ([a-z0-9-]+) -->\n)(.*?)(<!-- /record -->)", re.S)


class RecordError(Exception):
    """A record that is missing, incomplete, or does not match its manifest."""


class _About(dict):
    """``record.json``'s words; a missing one is a :class:`RecordError` naming the record."""

    def __init__(self, record: str, words: dict):
        super().__init__(words)
        self.record = record

    def __missing__(self, key):
        raise RecordError(f"record {self.record}: its record.json has no {key!r}")


# Options a record's command may leave out: where its run wrote, and how it showed progress.
_UNSTATED = ("--out", "--force", "--no-progress")
_UNSTATED_BY_STUDY = {"train": ("--checkpoint",)}  # the trained network's file
# Options whose values are paths: a value in capitals may stand for one (the text explains
# it); any other option is stated as run.
_PATH_OPTIONS = ("--out", "--data", "--data-root", "--weights", "--checkpoint",
                 "--early-exit-run")


def _script_study_line(script: Path, study: str) -> list[str] | None:
    """The words after ``-m studies.<study>`` in a shell script of this repository (its
    backslash continuations joined, ``"$@"`` dropped), or None if it runs no such study."""
    if not script.is_file() or not script.resolve().is_relative_to(REPO):
        return None
    text = script.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if f"studies.{study}" in words:
            rest = words[words.index(f"studies.{study}") + 1:]
            return [w for w in rest if w != "$@"]
    return None


def _options(words: list[str]) -> dict[str, list[str]]:
    """A command line's options, each with the words that follow it up to the next."""
    out: dict[str, list[str]] = {}
    current = None
    for w in words:
        if w.startswith("--"):
            current = out.setdefault(w, [])
        elif current is None:
            raise RecordError(f"a record's command has {w!r} before any option")
        else:
            current.append(w)
    return out


def _json_object(path: Path, whose: str, fix: str) -> dict:
    """The JSON object ``path`` holds; a RecordError naming ``whose`` file and what to do
    (``fix``) where it holds none (a file cut short or edited by hand, which no sha256
    guards)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not UTF-8
        raise RecordError(f"{whose}: {path.name} is not a JSON object ({err}); {fix}") from None
    if not isinstance(value, dict):
        raise RecordError(f"{whose}: {path.name} is not a JSON object (it holds a "
                          f"{type(value).__name__}); {fix}")
    return value


class Record:
    """One record folder: its manifest, its ``record.json`` and its verified outputs."""

    def __init__(self, name: str, root: Path = RECORDS):
        self.name, self.folder = name, root / name
        if not (self.folder / "manifest.json").is_file():
            raise RecordError(f"record {name}: no {self.folder / 'manifest.json'}")
        self.manifest = _json_object(self.folder / "manifest.json", f"record {name}",
                                     "copy the run's own manifest again (python "
                                     f"paper/readme.py --add {name}=RUN FILE ...)")
        about = self.folder / "record.json"
        if not about.is_file():
            raise RecordError(f"record {name}: no record.json (the command as run and the "
                              "machine, which the manifest cannot say): write it")
        self.about = _About(name, _json_object(about, f"record {name}", "rewrite it: the "
                                               "command as run and the machine"))
        self._shapes()
        git = self.manifest.get("git") or {}
        if not git.get("commit") or git.get("dirty") or "at_finish" in git:
            raise RecordError(f"record {name}: its run did not come from one clean commit "
                              f"(manifest git: {git}); rerun it from a checkout that stays "
                              "at one commit (a git worktree) and record that run")
        self._not_smoke()
        self._command_is_the_runs()
        outputs = self.manifest.get("outputs", {})
        for path in sorted(self.folder.iterdir()):
            if path.name in ("manifest.json", "record.json"):
                continue
            if path.name not in outputs:
                raise RecordError(f"record {name}: {path.name} is not an output of its run "
                                  "(its manifest does not list it)")
            if sha256_file(path) != outputs[path.name]:
                raise RecordError(f"record {name}: {path.name} differs from the output its "
                                  "manifest lists (sha256): copy the run's file unchanged")

    def _shapes(self) -> None:
        """The manifest's and ``record.json``'s fields the checks read are of the shapes a
        study and ``--add`` write: JSON edited by hand into another (no sha256 guards either
        file) is named here, not met as a TypeError by a check."""
        shape = manifest_shape(self.manifest)
        if shape is not None:
            raise RecordError(f"record {self.name}: its manifest.json is not a study's manifest "
                              f"(it holds {shape}); copy the run's own manifest again (python "
                              f"paper/readme.py --add {self.name}=RUN FILE ...)")
        if not isinstance(self.about.get("command", ""), str):
            raise RecordError(f"record {self.name}: its record.json is not the words a record "
                              "needs (command, the command line as run, is not text): rewrite "
                              "it")

    def csv(self, file: str) -> pd.DataFrame:
        return pd.read_csv(self._path(file))

    def json(self, file: str):
        return json.loads(self._path(file).read_text())

    def _not_smoke(self) -> None:
        """A README figure is never a smoke preset's (a test-sized run)."""
        if is_smoke_run(self.manifest):
            raise RecordError(f"record {self.name} is of a --smoke run; the README states "
                              "figures of real runs only")

    def _command_is_the_runs(self) -> None:
        """``record.json``'s command is the run's: ``python -m studies.<study>`` with the
        options its manifest's ``argv`` holds (values in capitals stand for a path the text
        explains; where a run wrote and how it showed progress may be left out), or a script
        of this repository that runs that study."""
        study = self.manifest.get("study")
        words = shlex.split(self.about["command"])
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words.pop(0)  # an environment variable set for the run
        words = next((words[:i] for i, w in enumerate(words) if w.startswith("(")), words)
        placeholder = r"[A-Z][A-Z0-9_]*"  # in a python -m command: a path the text explains
        if words[:1] in (["sh"], ["bash"]) and len(words) > 1:
            script = REPO / words[1]
            line = _script_study_line(script, study)
            if line is None:
                raise RecordError(f"record {self.name}: its command runs {words[1]}, which is "
                                  f"not a script of this repository that runs the {study} "
                                  "study")
            # the script's own options, then those the command adds after its first
            # argument (the script's output folder)
            extra = words[3:] if len(words) > 2 and not words[2].startswith("-") else words[2:]
            stated_words, placeholder = line + extra, r"\S*\$\S*"  # a shell variable
        elif words[:2] != ["python", "-m"] or len(words) < 3 or words[2] != f"studies.{study}":
            raise RecordError(f"record {self.name}: its command ({self.about['command']}) is "
                              f"not the run's (python -m studies.{study} ...)")
        else:
            stated_words = words[3:]
        stated = _options(stated_words)
        ran = _options(self.manifest.get("argv") or [])
        unstated = {*_UNSTATED, *_UNSTATED_BY_STUDY.get(study, ())}
        for option, values in stated.items():
            if option not in ran or len(ran[option]) != len(values) or not all(
                    v == r or (option in _PATH_OPTIONS and re.fullmatch(placeholder, v))
                    for v, r in zip(values, ran[option])):
                raise RecordError(f"record {self.name}: its command gives {option} "
                                  f"{' '.join(values)}, its run {option} "
                                  f"{' '.join(ran.get(option, ['(nothing)']))}")
        left = sorted(set(ran) - set(stated) - unstated)
        if left:
            raise RecordError(f"record {self.name}: its run had {', '.join(left)}, which its "
                              "command leaves out: write the command as run")

    def _path(self, file: str) -> Path:
        path = self.folder / file
        if not path.is_file():
            raise RecordError(f"record {self.name}: needs {file}; copy it from the run "
                              f"(python paper/readme.py --add {self.name}=RUN {file})")
        return path

    @property
    def commit(self) -> str:
        return self.manifest["git"]["commit"][:7]


# --------------------------------------------------------------------------- numbers in words


def _finite(x) -> float:
    # a JSON output's float that was not finite is null there (qerror.files.json_text)
    x = math.nan if x is None else float(x)
    if not math.isfinite(x):
        raise RecordError(f"a figure a passage states is {x}: the record does not hold it")
    return x


def pct(x: float) -> str:
    """A share as percent with two decimals: 0.8881 -> "88.81"."""
    return f"{100 * _finite(x):.2f}"


def plus(x: float, places: int) -> str:
    """``x`` with ``places`` decimals and its sign, none on a value that rounds to zero:
    1.234 -> "+1.23", -0.003 -> "0.00" at two places (never "-0.00"); the paper's
    :func:`studies._latex.signed` with a Markdown minus."""
    return signed(_finite(x), places, minus="-")


def points(x: float) -> str:
    """A difference of shares in percentage points, signed: 0.005 -> "+0.50"."""
    return plus(100 * _finite(x), 2)


def pvalue(p: float, alpha: float | None = None) -> str:
    """Two significant digits: 0.015, 7.4e-08, 1; with ``alpha``, the level the passage
    judges ``p`` at, more where two would print it on the other side of ``alpha``
    (:func:`qerror.stats.places_for`): 0.0496 at α = 0.05 is 0.0496, not 0.05."""
    p = _finite(p)
    digits = 2 if alpha is None else places_for(p, lambda v: v < alpha,
                                                lambda n: f"{p:.{n}g}", 2)
    return f"{p:.{digits}g}"


def span(values) -> str:
    """The range of ratios to two decimals, "0.60–0.67", or one figure where both ends
    read the same."""
    lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
    return lo if lo == hi else f"{lo}–{hi}"


def minutes(seconds: float) -> str:
    return f"{_finite(seconds) / 60:.1f}"


def level(confidence: float) -> str:
    """A confidence level in percent: 0.95 -> "95", 0.9 -> "90"."""
    return f"{round(100 * confidence, 6):g}"


def run_alpha(rec: Record) -> float:
    """The level of the tests and intervals of ``rec``'s run: its manifest's
    ``config.alpha`` (what a passage's "95 %" or "90 %" is derived from)."""
    alpha = (rec.manifest.get("config") or {}).get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
        raise RecordError(f"record {rec.name}: its manifest's config.alpha is {alpha!r}, not "
                          "a level in (0, 0.5): the level its intervals were computed at is "
                          "unknown")
    return float(alpha)


def common_alpha(recs) -> float:
    """The one :func:`run_alpha` of several records a passage states together."""
    alphas = {rec.name: run_alpha(rec) for rec in recs}
    if len(set(alphas.values())) != 1:
        raise RecordError(f"records {', '.join(alphas)} disagree on the level of their tests "
                          f"(config.alpha {sorted(set(alphas.values()))}): one label cannot "
                          "name their intervals")
    return next(iter(alphas.values()))


def wilson_level(rec: Record, accuracy: float, n: int, ci) -> float:
    """The confidence of ``ci``, the Wilson interval of an ``accuracy`` over ``n`` items
    from a run that does not record its level (``studies.train``): the one that reproduces
    both ends; a RecordError where none does."""
    k = round(_finite(accuracy) * n)
    lo, hi = (_finite(v) for v in ci)

    def half(z: float) -> float:
        p = k / n
        return z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))

    width = (hi - lo) / 2
    if not 0 < width < half(40.0):
        raise RecordError(f"record {rec.name}: [{lo}, {hi}] is not a Wilson interval of "
                          f"{k} of {n}")
    z = brentq(lambda z: half(z) - width, 1e-9, 40.0, xtol=1e-14)
    confidence = round(1 - 2 * float(norm.sf(z)), 6)
    if not np.allclose(wilson_ci(k, n, 1 - confidence).ci, (lo, hi), rtol=0, atol=1e-9):
        raise RecordError(f"record {rec.name}: [{lo}, {hi}] is not the Wilson interval of "
                          f"{k} of {n} at any level of six decimals")
    return confidence


def train_level(rec: Record, summary: dict) -> float:
    """The confidence of a training run's test interval: ``1 - test_ci_alpha`` where its
    summary records it, else the level that reproduces the interval (:func:`wilson_level`);
    a recorded level whose Wilson interval is not the one recorded is refused."""
    lo, hi = summary["test_ci"]
    if "test_ci_alpha" not in summary:
        return wilson_level(rec, summary["test_accuracy"], summary["test_n"], (lo, hi))
    alpha = summary["test_ci_alpha"]
    k = round(_finite(summary["test_accuracy"]) * summary["test_n"])
    if not np.allclose(wilson_ci(k, summary["test_n"], alpha).ci, (lo, hi), rtol=0,
                       atol=1e-9):
        raise RecordError(f"record {rec.name}: its test interval [{lo}, {hi}] is not the "
                          f"Wilson interval at the recorded test_ci_alpha {alpha!r}")
    return 1.0 - float(alpha)


def accuracy_ci(r) -> str:
    """A point's accuracy with its interval: "88.31 % [87.67, 88.93]"."""
    return f"{pct(r.acc)} % [{pct(r.acc_lo)}, {pct(r.acc_hi)}]"


# --------------------------------------------------------------------------- renderers


def compression_table(records) -> str:
    rec = records("compression")
    pts = rec.csv("points.csv").sort_values("bytes", ascending=False, kind="stable")
    # which models this record compared with dense (a record older than the paired tests
    # of the weightless and tiny-CNN points has none for them)
    untested = list(dict.fromkeys(
        pts[pts.p_vs_dense.isna() & (pts.method != "dense float32")
            & (pts.method != "INT8 early exit")].method))
    not_tested = "" if not untested else (
        f", nor for {', '.join(untested)}: measured on the same images, but this record's "
        "commit did not test them against dense (the study does now)")
    lines = [
        f"**The default run, measured** (`{rec.about['command']}`, commit {rec.commit}, "
        f"{rec.manifest['seconds'] / 60:.0f} minutes on {rec.about['machine']}; "
        f"{rec.about['early_exit']}; the baseline: the checkpoint the run found, sha256 "
        f"{rec.manifest['model']['sha256'][:12]}, "
        f"{pct(rec.manifest['model']['metrics']['test_accuracy'])} % on test when it was "
        "trained): every model on the whole test split, largest first "
        "(`points.csv`; \"vs dense\": percentage points against the baseline with McNemar's "
        f"p, none for the early exit, whose run kept no per-image results{not_tested}; "
        "\"front\": on the Pareto front of accuracy against bytes).",
        "",
        f"| model | configuration | bytes | accuracy % [{level(1 - run_alpha(rec))}% CI] "
        "| vs dense (points, McNemar p) "
        "| front |",
        "|---|---|---:|---|---|:-:|",
    ]
    for r in pts.itertuples():
        delta = "" if pd.isna(r.delta_vs_dense) else points(r.delta_vs_dense)
        if delta and not pd.isna(r.p_vs_dense):
            delta += f" (p {pvalue(r.p_vs_dense)})"
        lines.append(f"| {r.method} | {r.config} | {int(r.bytes):,} | {pct(r.acc)} "
                     f"[{pct(r.acc_lo)}, {pct(r.acc_hi)}] | {delta} | "
                     f"{'•' if r.on_front else ''} |")
    return "\n".join(lines)


def _sparse_goal_measured(goal, pts: pd.DataFrame, alpha: float) -> str:
    """A goal's measured text; the sparse goal's with what its verdict rests on, which a
    record made before the study said so lacks (taken from its points.csv, at ``alpha``,
    the level of the record's run)."""
    if not goal.goal.startswith("90%-sparse") or "point estimates" in goal.measured:
        return goal.measured
    row = pts[(pts.method == "pruned") & (pts.config == "90% sparse")]
    if row.empty or pd.isna(row.p_within_one_point.iloc[0]):
        return goal.measured
    return goal.measured + point_estimates_note(float(row.p_within_one_point.iloc[0]), alpha)


def compression_goals(records) -> str:
    rec = records("compression")
    goals = rec.csv("goals.csv")
    pts = rec.csv("points.csv")
    summary = rec.json("summary.json")
    best = summary["smallest_within_one_point"]
    alpha = run_alpha(rec)
    items = [f"- {g.goal}: **{g.verdict}** ({_sparse_goal_measured(g, pts, alpha)})."
             for g in goals.itertuples()]
    within = pts[pts.bytes <= 100_000].sort_values("acc", ascending=False)
    by_family = within.groupby("method", sort=False).head(1)
    top = pts.sort_values("acc", ascending=False).iloc[0]
    on_estimates = (f"{best['method']} ({best['config']}), {int(best['bytes']):,} bytes, "
                    f"{pct(best['acc'])} %")
    if "smallest_shown_within_one_point" in summary:
        shown = summary["smallest_shown_within_one_point"]
        holm_ = shown is not None and "p_within_one_point_holm" in shown
        tested = ("none" if shown is None else
                  f"{shown['method']} ({shown['config']}), {int(shown['bytes']):,} bytes, "
                  f"{pct(shown['acc'])} %, non-inferiority p "
                  f"{pvalue(shown['p_within_one_point'], None if holm_ else alpha)}"
                  + (f", {pvalue(shown['p_within_one_point_holm'], alpha)} Holm-adjusted over "
                     "the "
                     f"{int(pts.p_within_one_point.notna().sum())} models tested"
                     if holm_ else ""))
        items.append("- The smallest model shown within one point of the dense baseline "
                     "(paired non-inferiority test at a one-point margin"
                     + (", Holm-adjusted" if holm_ else "")
                     + f"): {tested}; on the point estimates alone: {on_estimates} "
                     "(`summary.json`).")
    else:
        items.append("- The smallest model within one point of the dense baseline on the point "
                     f"estimates (this record has no paired test of it): {on_estimates} "
                     "(`summary.json`).")
    items.append("- Within 100 kB, the most accurate of each kind: " + "; ".join(
        f"{r.method} {accuracy_ci(r)} ({int(r.bytes):,} "
        "bytes)" for r in by_family.itertuples()) + " (no test between them here).")
    vs = "" if pd.isna(top.p_vs_dense) else (f", {points(top.delta_vs_dense)} points against "
                                             f"the dense baseline, McNemar p "
                                             f"{pvalue(top.p_vs_dense)}")
    items.append(f"- The most accurate model of all: {top.method} ({top.config}), "
                 f"{pct(top.acc)} %{vs}.")
    return "At these defaults (`goals.csv`):\n\n" + "\n".join(items)


def _phases(timing: pd.Series) -> dict[str, float]:
    return {p: float(timing[f"measured_{p}_s"]) for p in
            ("pilot", "instrumented", "remedies", "headline", "curve")}


TRAIN_MINUTES_GOAL = 45  # the training budget on the slowest machine of this kind, minutes
ACCURACY_GOAL = 0.92  # the stand-in's test accuracy goal (the drift issue)


def baseline_train(records, name: str = "baseline-train") -> str:
    rec = records(name)
    s, t = rec.json("summary.json"), rec.json("timing.json")
    lo, hi = s["test_ci"]
    batch = s["recipe"]["batch_size"]
    return (
        f"A recorded run of `{rec.about['command']}` (commit {rec.commit}) trained for "
        f"{minutes(t['train_seconds'])} minutes (`timing.json`: `train_seconds` "
        f"{t['train_seconds']:.0f}; {s['steps']:,} steps of {batch} images, median step "
        f"{t['median_step_seconds']:.2f} s, {t['torch_threads']} torch thread"
        f"{'s' if t['torch_threads'] != 1 else ''}) on {rec.about['machine']}, and reached "
        f"{pct(s['test_accuracy'])} % [{pct(lo)}, {pct(hi)}] on the {s['test_n']:,} test "
        f"images (`summary.json`, {level(train_level(rec, s))} % Wilson interval).")


def baseline_train_avx2(records) -> str:
    """The same training on a CPU without AVX-512, against the training budget."""
    rec = records("baseline-train-avx2")
    t = rec.json("timing.json")["train_seconds"]
    return (baseline_train(records, "baseline-train-avx2").replace("A recorded run", "A run")
            + f" That is {'within' if t <= TRAIN_MINUTES_GOAL * 60 else 'beyond'} the "
            f"{TRAIN_MINUTES_GOAL}-minute training budget on the slowest machine of this kind; "
            "the float sums of AVX2 and AVX-512 kernels differ, so the two runs "
            "train two different networks from the same seed.")


def stem_frontier(records) -> str:
    bench, c3, base = records("bench-models"), records("train-conv3-pool"), \
        records("baseline-train")
    b = bench.csv("bench.csv")
    steps = {}
    for stem in ("conv3-pool", "cifar"):
        r = _one_row(bench, b, (b.group == "models") & b.name.str.endswith(f"stem {stem}"),
                     f"stem {stem}")
        steps[stem] = (r.ratio_median, float(re.match(r"([\d.]+) vs", r.note).group(1)))
    s, t = c3.json("summary.json"), c3.json("timing.json")
    s0 = base.json("summary.json")
    lo, hi = s["test_ci"]
    gap = s["test_accuracy"] - s0["test_accuracy"]
    return (
        f"Measured with `{bench.about['command']}` ({bench.about['machine']}, commit "
        f"{bench.commit}), a ResNet50 training step of 128 images takes "
        f"{steps['conv3-pool'][0]:.2f}× the default's with `conv3-pool` "
        f"({steps['conv3-pool'][1]:.1f} s) and {steps['cifar'][0]:.1f}× with `cifar` "
        f"({steps['cifar'][1]:.1f} s). Trained, `{c3.about['command']}` (the default recipe, "
        f"three epochs; {c3.about['machine']}, commit {c3.commit}) reached "
        f"{pct(s['test_accuracy'])} % [{pct(lo)}, {pct(hi)}] test accuracy after "
        f"{minutes(t['train_seconds'])} minutes of training (`summary.json`), "
        f"{points(gap)} points against the default's {pct(s0['test_accuracy'])} %"
        + (f", and {'below' if s['test_accuracy'] < ACCURACY_GOAL else 'above'} "
           f"{100 * ACCURACY_GOAL:g} %.")
        + _frontier_verdict(records, steps, s["test_accuracy"]))


def _frontier_verdict(records, steps: dict, accuracy: float) -> str:
    """Whether a stem that keeps every stage at 2×2 or more fits the training budget on the
    slowest machine (the default's recorded time there times its step ratio) and reaches the
    accuracy goal: the frontier's conclusion, from the records."""
    slow = records("baseline-train-avx2").json("timing.json")["train_seconds"] / 60
    ratio = min(r for r, _ in steps.values())
    fits = slow * ratio <= TRAIN_MINUTES_GOAL
    accurate = accuracy >= ACCURACY_GOAL
    verdict = ("One option meets the accuracy, the geometry and the time together."
               if fits and accurate else
               "No option measured meets the accuracy, the geometry and the time together.")
    return (f" At the cheaper stem's ratio, the default's {slow:.1f} minutes on the slowest "
            f"machine of this kind (record baseline-train-avx2) become about "
            f"{slow * ratio:.0f}, {'within' if fits else 'beyond'} the "
            f"{TRAIN_MINUTES_GOAL}-minute budget. {verdict}")


DRIFT_MINUTES_GOAL = 10  # the drift issue's goal for the warm default run, minutes


def drift_verdict(seconds: float) -> str:
    """"within" or "beyond" the drift goal for a warm default run of ``seconds``."""
    return "within" if seconds <= DRIFT_MINUTES_GOAL * 60 else "beyond"


def _differing_results(rec: Record, other: Record) -> tuple[list[str], list[str]]:
    """``rec``'s result files (its ``*.csv`` outputs but the timing ones) and those of them
    whose sha256 differs from ``other``'s."""
    timing = set(rec.manifest.get("timing_outputs", [])) | {"timing.csv"}
    results = sorted(n for n in rec.manifest["outputs"] if n.endswith(".csv") and n not in timing)
    return results, [n for n in results
                     if rec.manifest["outputs"][n] != other.manifest["outputs"].get(n)]


def _require_avx512(rec: Record, what: str = "a run", *, present: bool = True) -> None:
    """Refuse a record made on a CPU with AVX-512 where a passage speaks of one without it
    (``present=False``), or on one without where the passage speaks of one with it."""
    if ("avx512f" in rec.manifest["cpu"].get("cpu_flags", [])) != present:
        raise RecordError(f"record {rec.name}: its CPU has {'no ' if present else ''}AVX-512; "
                          f"record {what} from a CPU {'with' if present else 'without'} it")


def median_words(rec: Record, pairs) -> str:
    """How a bench row's median interval is named: its exact coverage for the row's pairs at
    the run's sought level (:func:`qerror.stats.median_ranks`: the order statistics make it
    at least that level, e.g. 93.5 % for 11 pairs at 90 %), "93.5 % interval"."""
    cover = median_ranks(int(pairs), 1.0 - median_level(rec))[1] if pairs >= 1 else math.nan
    if not math.isfinite(cover):
        raise RecordError(f"record {rec.name}: a row of {pairs} pairs has no interval of its "
                          f"median at {level(median_level(rec))} %")
    return f"{100 * cover:.1f} % interval"


def median_level(rec: Record) -> float:
    """The coverage of a bench record's ``median_lo``/``median_hi``: its manifest's
    ``config.median_level``; a RecordError for a run from before the bench recorded it
    (none of the records with intervals is)."""
    config = rec.manifest.get("config") or {}
    if "median_level" not in config:
        raise RecordError(f"record {rec.name}: its manifest has no config.median_level, so "
                          "the level of its median intervals is unknown; record a run of "
                          "python -m studies.bench, which states it")
    value = config["median_level"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise RecordError(f"record {rec.name}: its manifest's config.median_level is "
                          f"{value!r}, not a coverage in (0, 1)")
    return float(value)


def _ratio_span(row, over: str = "") -> str:
    """A bench row's median ratio and its range over the pairs, "1.41× (1.26–1.83)"."""
    return f"{row.ratio_median:.2f}× ({row.ratio_min:.2f}–{row.ratio_max:.2f}{over})"


def _bench_row(rec: Record, bench: pd.DataFrame, name_has: str, baseline: str) -> pd.Series:
    """The one row of ``bench`` whose name contains ``name_has``, against ``baseline``."""
    return _one_row(rec, bench, bench.name.str.contains(name_has, regex=False)
                    & (bench.baseline == baseline), f"{name_has!r} against {baseline!r}")


def drift_time(records) -> str:
    rec, block = records("drift"), records("drift-block-engine")
    t = rec.csv("timing.csv").iloc[0]
    tb = block.csv("timing.csv").iloc[0]
    ph = _phases(t)
    configs = int(t.configurations)
    widths = len(rec.manifest["config"]["bits"])
    results, differ = _differing_results(rec, block)
    same = ("every result file (`*.csv` but `timing.csv`) of the two is byte for byte the same"
            if not differ else f"{len(differ)} of its {len(results)} result files differ "
            f"({', '.join(differ)})")
    env = rec.about.get("environment")
    return (
        f"With the baseline cached the default run took {minutes(t.measured_s)} minutes "
        f"(`timing.csv`: `measured_s` {t.measured_s:.0f}, commit {rec.commit}, the fused exact "
        f"quantizer compiled on first use) on {rec.about['machine']} and {rec.about['kernels']}"
        + (f" (`{env}`)" if env else "") + f": {minutes(ph['pilot'])} minutes for the pilot that "
        f"sizes the subset ({rec.manifest['config']['chosen_images']} images, as \"How many "
        "images, and what they resolve\" says), "
        f"{minutes(ph['instrumented'])} for the {configs} instrumented configurations (each "
        f"width's {configs // widths} in one K-way batch) and their analysis, "
        f"{minutes(ph['remedies'])} for the remedies, {minutes(ph['headline'])} for the "
        f"whole-test-split headline, {minutes(ph['curve'])} for the remedies' calibration "
        "curve (which `--calib-curve` with no value leaves out). The same run with the block "
        f"quantizer (`QERROR_FUSED=0`, commit {block.commit}) took {tb.measured_s:.0f} s, and "
        f"{same}. That is the AVX2 code on a fast core; a CPU that has only AVX2 is slower "
        "(next).")

def drift_time_avx2(records) -> str:
    """The default run on a CPU without AVX-512, against the goal for the warm run."""
    rec, train = records("drift-avx2"), records("baseline-train-avx2")
    t = rec.csv("timing.csv").iloc[0]
    ph, cpu = _phases(t), rec.manifest["cpu"]
    _require_avx512(rec, present=False)
    saturates = cpu.get("saturates_pairs")
    if saturates is None:  # read as False, it printed "not saturating"
        raise RecordError(f"record {rec.name}: its kernel probe could not tell whether FBGEMM "
                          "saturates its int16 pair sums, which the passage states; record a "
                          "run whose probe could")
    verdict = drift_verdict(t.measured_s)
    return (
        f"On a CPU with AVX2 and no AVX-512 (`{rec.about['command']}`, commit {rec.commit}, "
        f"{rec.about['machine']}; {cpu['cpu_capability']} kernels, FBGEMM "
        + ("saturating" if saturates else "not saturating")
        + f" its int16 pair sums) the warm default run took {minutes(t.measured_s)} minutes "
        f"(`measured_s` {t.measured_s:.0f}; pilot {minutes(ph['pilot'])}, instrumented "
        f"{minutes(ph['instrumented'])}, remedies {minutes(ph['remedies'])}, headline "
        f"{minutes(ph['headline'])}, calibration curve {minutes(ph['curve'])}), "
        f"{rec.manifest['config']['chosen_images']} images: {verdict} the "
        f"{DRIFT_MINUTES_GOAL}-minute goal for it on the slowest machine of this kind. Its "
        f"baseline trained there in {minutes(train.json('timing.json')['train_seconds'])} "
        "minutes (above).")


def drift_speed_avx2(records) -> str:
    """The default run before and after its plain passes went channels_last, on one
    AVX2-only machine, phase by phase, against the goal; which results moved and by how
    much (summation order)."""
    old, new = records("drift-avx2-before"), records("drift-avx2-after")
    for rec in (old, new):
        _require_avx512(rec, present=False)
    if old.about["machine"] != new.about["machine"]:
        raise RecordError("records drift-avx2-before and drift-avx2-after: not run on one "
                          "machine (their record.json machine texts differ)")
    to, tn = old.csv("timing.csv").iloc[0], new.csv("timing.csv").iloc[0]
    po, pn = _phases(to), _phases(tn)
    results, differ = _differing_results(new, old)
    ho, hn = old.csv("headline.csv").set_index("mode"), new.csv("headline.csv").set_index("mode")
    moved = (hn.acc - ho.acc).abs()
    half = (hn.acc_hi - hn.acc_lo) / 2
    verdict = drift_verdict(tn.measured_s)
    names = {"headline": "headline", "curve": "calibration curve", "remedies": "remedies",
             "instrumented": "instrumented", "pilot": "pilot"}
    steps = ", ".join(f"{names[p]} {minutes(po[p])} → {minutes(pn[p])}" for p in names)
    change = {p: pn[p] / po[p] - 1 for p in names}
    spread = abs(change["instrumented"])  # code unchanged: the runs' own spread
    beyond = [names[p] for p in ("headline", "curve", "remedies") if -change[p] > spread]
    within = [names[p] for p in ("headline", "curve", "remedies") if -change[p] <= spread]
    return (
        "Since then the plain passes (the headline, the calibration curve, BatchNorm "
        "re-estimation) run channels_last in the deterministic modes "
        "(`qerror.nn.models.memory_format` and `forward_layout`; the quantizer now keeps a "
        "channels_last activation's layout instead of copying it to C order), and the "
        "headline takes the weights the run has quantized. Both commits' default runs on one "
        f"machine ({new.about['machine']}; `{new.about['command']}`): "
        f"{minutes(to.measured_s)} minutes at commit {old.commit}, {minutes(tn.measured_s)} "
        f"at commit {new.commit} ({steps} minutes): {verdict} the "
        f"{DRIFT_MINUTES_GOAL}-minute goal. The instrumented phase's code did not change, so "
        f"its {plus(100 * change['instrumented'], 0)} % is the spread between two runs here; "
        + (f"the gain of the {' and the '.join(beyond)} "
           f"({', '.join(f'{plus(100 * change[p], 0)} %' for p in names if names[p] in beyond)}) "
           "is beyond it" if beyond else "no phase's gain is beyond it")
        + (f", that of the {' and the '.join(within)} is not (one run each; the bench's "
           "paired timings below measure the layouts themselves)" if within else "")
        + ". A channels_last convolution sums in another "
        f"order, so {len(differ)} of the {len(results)} result files differ "
        f"({', '.join(differ) if differ else 'none'}); the largest change of a headline "
        f"accuracy is {100 * moved.max():.2f} points ({moved.idxmax()}), "
        + ("less than" if moved.max() < half.loc[moved.idxmax()] else "not less than")
        + f" its interval's half-width ({100 * half.loc[moved.idxmax()]:.2f}).")


_PHASE_NAMES = {"headline": "headline", "curve": "calibration curve", "remedies": "remedies",
                "instrumented": "instrumented (with each configuration's analysis)",
                "pilot": "pilot"}


def _drift_speed_step(records, old: str, new: str, what: str, why: str) -> str:
    """Default run ``new`` against ``old`` on the same AVX2-only CPU kind, phase by phase:
    which phases changed by more than the spread of the instrumented phase between the runs
    before and after the first speed step (records drift-avx2-before and drift-avx2-after,
    whose instrumented code was the same); which result files moved (``why``: in what
    way)."""
    o, n = records(old), records(new)
    _require_avx512(n, present=False)
    if o.manifest["cpu"] != n.manifest["cpu"]:
        raise RecordError(f"records {old} and {new}: not run on one kind of CPU (their "
                          "manifests' cpu entries differ)")
    to, tn = o.csv("timing.csv").iloc[0], n.csv("timing.csv").iloc[0]
    po, pn = _phases(to), _phases(tn)
    spread = abs(_phases(records("drift-avx2-after").csv("timing.csv").iloc[0])["instrumented"]
                 / _phases(records("drift-avx2-before").csv("timing.csv").iloc[0])[
                     "instrumented"] - 1)
    results, differ = _differing_results(n, o)
    verdict = drift_verdict(tn.measured_s)
    steps = ", ".join(f"{_PHASE_NAMES[p]} {minutes(po[p])} → {minutes(pn[p])}"
                      for p in _PHASE_NAMES)
    change = {p: pn[p] / po[p] - 1 for p in _PHASE_NAMES}
    beyond = [p for p in _PHASE_NAMES if abs(change[p]) > spread]
    return (
        f"{what} The default run at commit {n.commit} ({n.about['machine']}; "
        f"`{n.about['command']}`) took {minutes(tn.measured_s)} minutes "
        f"({tn.measured_s:.0f} s) against {minutes(to.measured_s)} ({to.measured_s:.0f} s) at "
        f"commit {o.commit} ({steps} minutes): {verdict} the "
        f"{DRIFT_MINUTES_GOAL}-minute goal. One run each: a phase whose code had not changed "
        f"differed by {100 * spread:.0f} % between the two runs before the first of these "
        "steps, and "
        + (f"only the change of the {' and the '.join(_PHASE_NAMES[p] for p in beyond)} ("
           + ", ".join(f"{plus(100 * change[p], 0)} %" for p in beyond) + ") is beyond that"
           if beyond else "no phase changed by more than that")
        + f". {len(differ)} of the {len(results)} result files differ "
        f"({', '.join(differ) if differ else 'none'}){why}.")


def drift_speed_avx2_next(records) -> str:
    """The default run after the next round of speed work, on the same AVX2-only machine
    kind, phase by phase against the run before it; which result files moved."""
    return _drift_speed_step(
        records, "drift-avx2-after", "drift-avx2-next",
        "Then stochastic rounding joined the fused quantizer (the same draws, code for code), "
        "empirical bias correction came from the float forward with each layer's quantized "
        "version beside it (`qerror.nn.local_error_means`) instead of an instrumented pass, "
        "the remedies' three networks shared one K-way batch, the calibration curve took its "
        "float and unremedied logits from the headline's forwards, the fused quantizer "
        "counted non-finite values in its own loop, the instrumented pass's small sums "
        "moved to numpy, and the growth bootstraps fit all their resamples at once.",
        ": float sums in another order (the remedies' passes in another batch size, the "
        "bootstraps' fits vectorised)")


def drift_speed_avx2_prepared(records) -> str:
    """The default run with prepared activation quantizers and larger K-way chunks against
    the commit before them, run one after the other on one machine; the first run of the
    new code, earlier that day, beside them."""
    first = records("drift-avx2-prepared")
    _require_avx512(first, present=False)
    t = first.csv("timing.csv").iloc[0]
    return _drift_speed_step(
        records, "drift-avx2-pair-old", "drift-avx2-pair-new",
        "Then the instrumented passes quantized each layer's input with a "
        "`qerror.PreparedQuantizer` (its scale and zero point checked once per pass instead "
        "of on every call: the bench's row below), and the study's K-way passes took chunks "
        "of at least 64 images instead of 32 (`studies.drift.KWAY_CHUNK`; the bench's row "
        "below). The two commits were run one after the other on one machine, the old "
        "first.",
        ": float sums in another order (the passes' statistics added in other chunks, and "
        "convolutions over other batch sizes). A first run of the new code, earlier the same "
        f"day on the same machine (commit {first.commit}), took {minutes(t.measured_s)} "
        "minutes")


def _layout_row(rec: Record, what: str) -> tuple[pd.Series, re.Match]:
    """A bench record's plain ``what`` forward, channels_last against contiguous, and the
    match of its note's "channels_last vs contiguous images/s"."""
    b = rec.csv("bench.csv")
    row = _bench_row(rec, b[b.group == "drift"], f"plain {what} forward", "contiguous")
    rates = re.match(r"(\d+) vs (\d+) images/s", row.note)
    if not rates:
        raise RecordError(f"record {rec.name}: a layout row's note lacks its images/s")
    return row, rates


def _overheads(rec: Record) -> tuple[pd.Series, pd.Series]:
    """``measure``'s row against its bare paired passes and ``measure_many``'s against its
    bare K-way passes, from a bench record's drift group."""
    b = rec.csv("bench.csv")
    # the goal's rows, not their twins without the local error (bench-drift-local)
    b = b[(b.group == "drift") & ~b.candidate.str.endswith("(local_samples=0)")]
    one = _bench_row(rec, b, "8-bit toward_zero", "paired passes, no statistics")
    many = b[b.candidate.str.startswith("measure_many") & b.baseline.str.startswith("the same")]
    if len(many) != 1:
        raise RecordError(f"record {rec.name}: expected one measure_many row against its "
                          "bare passes")
    return one, many.iloc[0]


def _layouts(rec: Record) -> list[tuple[str, pd.Series, re.Match]]:
    """The bench record's three layout rows (:func:`_layout_row`), each with its words:
    float, 8-bit truncation, 8-bit stochastic rounding."""
    return [(words, *_layout_row(rec, what)) for words, what in (
        ("float", "float"), ("8-bit truncation", "8-bit toward_zero"),
        ("8-bit stochastic rounding", "8-bit stochastic"))]


def _without_local(rec: Record) -> dict[str, pd.Series]:
    """``measure``'s and ``measure_many``'s rows without the local error
    (``local_samples=0``) from a bench record's drift group, by name."""
    b = rec.csv("bench.csv")
    b = b[b.group == "drift"]
    return {what: _one_row(rec, b, b.candidate == f"{what} (local_samples=0)",
                           f"{what} without the local error")
            for what in ("measure", "measure_many")}


def bench_layout_avx2(records) -> str:
    """The plain forward's layouts and the instrumentation overhead, benched on the AVX2-only
    machine of the drift-speed records."""
    rec = records("bench-drift-avx2")
    _require_avx512(rec, "a bench run", present=False)
    one, many = _overheads(rec)
    return (
        f"The layouts, benched on that machine (`{rec.about['command']}`, commit "
        f"{rec.commit}, ResNet50, batch 256, alternating paired timings; images/s from each "
        "layout's median time, the time ratio the median of the pairs' ratios, so the two "
        "can point different ways where the layouts differ by less than the pairs' spread): "
        "the plain forward ran channels_last against contiguous at "
        + "; ".join(f"{w} {m.group(1)} against {m.group(2)} images/s (time ratio "
                    f"{r.ratio_median:.3f})" for w, r, m in _layouts(rec))
        + ". The instrumentation's overhead there: `measure` "
        f"{one.ratio_median:.2f}× its bare paired passes and `measure_many` "
        f"{many.ratio_median:.2f}× its bare K-way passes (goal {one.goal:g}×).")


def bench_drift_avx2_next(records) -> str:
    """The drift group benched again after this round of speed work, beside the earlier
    bench on the same kind of machine: the stochastic plain forward (fused now), the
    instrumentation's overhead (with each ratio's range over the pairs) and peak memory."""
    old, new = records("bench-drift-avx2"), records("bench-drift-avx2-next")
    _require_avx512(new, "a bench run", present=False)
    # contiguous: the layout the run uses for stochastic rounding
    rates = [int(_layout_row(rec, "8-bit stochastic")[1].group(2)) for rec in (old, new)]
    (o1, om), (n1, nm) = _overheads(old), _overheads(new)
    b = new.csv("bench.csv")
    mem = b[(b.group == "drift") & b.name.str.contains("peak memory", regex=False)]
    if len(mem) != 3:
        raise RecordError(f"record {new.name}: expected three peak-memory rows")

    def span(r):
        return _ratio_span(r, " over the pairs")

    return (
        f"Benched again after it (`{new.about['command']}`, commit {new.commit}, "
        f"{new.about['machine']}): the plain 8-bit stochastic forward ran at {rates[1]} "
        f"images/s against {rates[0]} before (fused now); `measure_many` {span(nm)} its bare "
        f"K-way passes (before {om.ratio_median:.2f}×), `measure` {span(n1)} its bare paired "
        f"passes (before {o1.ratio_median:.2f}×): the goal of {n1.goal:g}× is "
        + ("met by both" if max(n1.ratio_median, nm.ratio_median) <= n1.goal else "not met")
        + "; `measure`'s figure moved "
        + ("less" if abs(n1.ratio_median - o1.ratio_median) < n1.ratio_max - n1.ratio_min
           else "more")
        + " than its own range over the pairs. Peak memory "
        + " / ".join(f"{r.ratio_median:.2f}×" for r in mem.itertuples())
        + " the float forward (default passes / one paired pass / 5-way default; goal "
        f"{mem.goal.iloc[0]:g}×).")


def bench_drift_avx2_prepared(records) -> str:
    """The drift group benched after the prepared quantizers and the study's larger K-way
    chunks: their own rows, and the instrumentation's overhead beside the bench before."""
    span = _ratio_span  # the median and its range over the pairs
    old, new = records("bench-drift-avx2-next"), records("bench-drift-avx2-prepared")
    _require_avx512(new, "a bench run", present=False)
    b = new.csv("bench.csv")
    b = b[b.group == "drift"]
    prep = _bench_row(new, b, "activation", "fake_quantize (same arguments)")
    chunk = _one_row(new, b, b.candidate.str.contains("KWAY_CHUNK", regex=False),
                     "the K-way chunk row")
    calls = re.match(r"(\d+) vs (\d+) µs a call", prep.note)
    if not calls:
        raise RecordError(f"record {new.name}: the PreparedQuantizer row's note lacks its µs")
    (o1, om), (n1, nm) = _overheads(old), _overheads(new)


    return (
        f"Benched after them (`{new.about['command']}`, commit {new.commit}, same machine "
        f"kind): a `PreparedQuantizer` call took {span(prep)} the time of `fake_quantize` "
        f"with the same arguments on {prep['name'].split(' activation ')[1]} "
        f"({calls.group(1)} against {calls.group(2)} µs a call); the study's "
        "15-configuration "
        f"K-way batch in chunks of 64 took {span(chunk)} the time of chunks of 32. "
        f"`measure_many` {span(nm)} its bare K-way passes (before {om.ratio_median:.2f}×) and "
        f"`measure` {span(n1)} its bare paired passes (before {o1.ratio_median:.2f}×): the "
        f"quantizer's saving is in both sides of these ratios; the goal of {n1.goal:g}× is "
        + ("met by both." if max(n1.ratio_median, nm.ratio_median) <= n1.goal else "not met."))


def drift_speed_avx2_sums(records) -> str:
    """The default run with the instrument's sums compiled against the commit before them,
    run one after the other on one machine; how far the old commit's time here is from the
    earlier run of nearly the same code (the machine's own drift between sessions)."""
    before = records("drift-avx2-pair-new").csv("timing.csv").iloc[0].measured_s
    old = records("drift-avx2-sums-old").csv("timing.csv").iloc[0].measured_s
    second = records("drift-avx2-sums-second")
    _require_avx512(second, present=False)
    again = second.csv("timing.csv").iloc[0].measured_s
    return _drift_speed_step(
        records, "drift-avx2-sums-old", "drift-avx2-sums-new",
        "Then the instrumented passes summed each layer's output as it was made, in one "
        "compiled pass over the quantized and the float output (`qerror.nn._moments`: the "
        "error's, both outputs' and their squares' sums per image and channel), instead of "
        "writing the error out and reducing it and the whole pass's output with torch, two "
        "passes each. The two commits were run one after the other on one machine, the old "
        "first.",
        ": float sums in another order (float32 sums of each image's channel added in the "
        f"compiled loop's order). The old commit's run took {abs(100 * (old / before - 1)):.0f} "
        f"% {'less' if old < before else 'more'} time than the previous passage's run of "
        "nearly the same code, earlier the same day on a machine of the same kind: a whole "
        "run's "
        "time moves by that much between hours. A second run of the new code, right after "
        f"(commit {second.commit}), took {minutes(again)} minutes ({again:.0f} s)")


def _sums_call(rec: Record, map_of: str) -> tuple[str, str]:
    """The µs a call of the compiled sums and of torch's reductions on the output of layer
    ``map_of``, from a bench record's sums rows."""
    b = rec.csv("bench.csv")
    row = _one_row(rec, b, (b.group == "drift") & (b.candidate == "difference_sums, compiled "
                                                   "loop") & b.name.str.endswith(f"of {map_of}"),
                   f"the compiled sums of {map_of}'s output")
    calls = re.match(r"(\d+) vs (\d+) µs a call", row.note)
    if not calls:
        raise RecordError(f"record {rec.name}: the compiled-sums row of {map_of} lacks its µs")
    return calls.group(1), calls.group(2)


def bench_drift_avx512(records) -> str:
    """The instrumentation's overhead benched on a CPU with AVX-512: the commit before the
    short maps' kernels and the one-call-per-site sums, and the commit after them, one after
    the other on one machine; the 2×2 map's sums before and after; measure_many's memory."""
    span = _ratio_span
    old, new = records("bench-drift-avx512-old"), records("bench-drift-avx512-new")
    final = records("bench-drift-avx512-final")
    for rec in (old, new, final):
        _require_avx512(rec, "a bench run")
    (o1, om), (n1, nm), (f1, fm) = _overheads(old), _overheads(new), _overheads(final)
    (oc, ot), (nc, nt) = _sums_call(old, "layer3.1.conv2"), _sums_call(new, "layer3.1.conv2")
    b = new.csv("bench.csv")
    mem = _one_row(new, b, (b.group == "drift") & b.candidate.str.startswith("measure_many")
                   & b.name.str.contains("peak memory", regex=False), "measure_many's memory")
    met = [w for w, r in (("`measure`", f1), ("`measure_many`", fm)) if r.ratio_median <= f1.goal]
    return (
        f"On a CPU with AVX-512 (`{new.about['command']}`, {new.about['machine']}), the commit "
        f"before the next two changes ({old.commit}) and the commit after them ({new.commit}), "
        "one after the other: maps of at most four positions summed by a kernel of their own "
        "per size, which inductor unrolls (with a symbolic size it looped over the 2 or 4 "
        "positions of every image and channel), and every quantized network's sums of a pass "
        "in one call per site (`difference_sums(..., chunks=K)`) instead of one per network. "
        f"`measure` {span(o1)} → {span(n1)} its bare paired passes, `measure_many` "
        f"{span(om)} → {span(nm)} its bare K-way passes"
        + (f"; `measure`'s two medians each lie within the other's range over its "
           f"{int(n1.pairs)} pairs, which do not resolve the change there"
           if o1.ratio_min <= n1.ratio_median <= o1.ratio_max
           and n1.ratio_min <= o1.ratio_median <= n1.ratio_max else "")
        + f". Benched again at commit {final.commit} with {int(f1.pairs)} pairs for these two "
        f"rows: `measure` {span(f1)}, `measure_many` {span(fm)}; the goal of {f1.goal:g}× is "
        + ("met by both" if len(met) == 2 else f"met by {met[0]} alone" if met else "not met")
        + f". The compiled sums of layer3.1.conv2's 2×2 output took {oc} µs a call before "
        f"and {nc} after (torch's reductions {ot} and {nt}); `measure_many`'s peak memory "
        f"{mem.ratio_median:.2f}× the float forward's (goal {mem.goal:g}×).")


def drift_time_avx2_head(records) -> str:
    """The warm default run again on a CPU with AVX2 only, at a later commit, against the
    goal, with the commit of record drift-avx2-sums-second run right after it on the same
    machine and baseline (what the machine changed, apart from the code); and its INT8
    cross-check there, where FBGEMM's groupwise kernel saturates, which the probe of the
    earlier records did not ask."""
    rec, old, was = (records("drift-avx2-head"), records("drift-avx2-head-old"),
                     records("drift-avx2-sums-second"))
    for r in (rec, old):
        _require_avx512(r, present=False)
    if old.commit != was.commit or old.about["machine"] != rec.about["machine"]:
        raise RecordError("record drift-avx2-head-old: not the commit of record "
                          "drift-avx2-sums-second run on the machine of drift-avx2-head")
    t, to, tw = (r.csv("timing.csv").iloc[0] for r in (rec, old, was))
    ph, cpu = _phases(t), rec.manifest["cpu"]
    if cpu.get("faithful") != "saturating" or cpu.get("groupwise_saturates") is not True:
        raise RecordError(f"record {rec.name}: its kernel probe did not find FBGEMM saturating "
                          "int16 pair sums, its groupwise kernel too, which the passage states")
    x = rec.csv("int8_summary.csv")
    f = _one_row(rec, x, (x.activations == "full_range") & x.faithful.astype(bool),
                 "the faithful full-range INT8 cross-check")

    def change(new: float, base: float) -> str:
        return f"{abs(100 * (new / base - 1)):.0f} % {'more' if new > base else 'less'} time"

    return (
        f"Again on a CPU with AVX2 and no AVX-512, at commit {rec.commit} "
        f"(`{rec.about['command']}`, {rec.about['machine']}): the warm default run took "
        f"{minutes(t.measured_s)} minutes (`measured_s` {t.measured_s:.0f}; pilot "
        f"{minutes(ph['pilot'])}, instrumented {minutes(ph['instrumented'])}, remedies "
        f"{minutes(ph['remedies'])}, headline {minutes(ph['headline'])}, calibration curve "
        f"{minutes(ph['curve'])}, INT8 cross-check {minutes(t.measured_int8_s)}), "
        f"{rec.manifest['config']['chosen_images']} images: {drift_verdict(t.measured_s)} the "
        f"{DRIFT_MINUTES_GOAL}-minute goal. The commit of record drift-avx2-sums-second "
        f"({old.commit}), run right after it on the same machine with the same baseline, took "
        f"{minutes(to.measured_s)} minutes ({drift_verdict(to.measured_s)} the goal; "
        f"{minutes(tw.measured_s)} on that record's machine): the later commit's instrumented "
        f"phase took {change(ph['instrumented'], _phases(to)['instrumented'])} and its pilot "
        f"{change(ph['pilot'], _phases(to)['pilot'])}, the whole run "
        f"{change(t.measured_s, to.measured_s)}; one run of each, which the hour-to-hour "
        "movement of a whole run (record drift-speed-avx2-sums) does not resolve for the whole. "
        "The pilot "
        f"measured the plain float forward at {t.plain_images_per_s:.0f} and "
        f"{to.plain_images_per_s:.0f} images/s in these two runs against "
        f"{tw.plain_images_per_s:.0f} in that record's, and the instrumented K-way passes at "
        f"{t.images_per_s_per_config:.0f} and {to.images_per_s_per_config:.0f} images/s per "
        f"configuration against {tw.images_per_s_per_config:.0f}: machines of this kind "
        "differ that much. The kernel probe found FBGEMM saturating its int16 pair sums, its "
        "groupwise kernel (3x3 convolutions with 8 or 16 channels in and out) too, which on "
        "CPUs with AVX512-VNNI held to AVX2 does not saturate (`qerror.nn.int8`'s notes); the "
        f"faithful pipeline ({f.arithmetic}/{f.pipeline}) reproduced {int(f.equal):,} of "
        f"{int(f.elements):,} full-range output codes of the cross-check, "
        f"{int(f.avx2_saturated):,} of them from saturated pair sums.")


def drift_time_avx2_pilot(records) -> str:
    """The warm default run on the machine of record drift-avx2-head once the pilot carried
    the local error on the run's share of its images: the time against the goal, the pilot
    against that record's, the instrumented phase's estimate from the pilot's rate against
    its measured time in both runs, and the same run an hour later (the machine's spread)."""
    rec, was, again = (records("drift-avx2-pilot"), records("drift-avx2-head"),
                       records("drift-avx2-pilot-again"))
    for r in (rec, again):
        _require_avx512(r, present=False)
    t, tw, ta = (r.csv("timing.csv").iloc[0] for r in (rec, was, again))
    ph, pw, pa = _phases(t), _phases(tw), _phases(ta)
    for r, tt in ((rec, t), (was, tw)):
        if tt.rate_source != "pilot":
            raise RecordError(f"record {r.name}: its instrumented estimate is not the pilot's "
                              "rate, which the passage compares")
    c = rec.manifest["config"]
    pilot, local, batch = c["pilot_images"], c["local_samples"], c["batch_size"]
    rest, rest_was = (sum(v for k, v in p.items() if k != "pilot") for p in (ph, pw))

    def verdict_of(seconds: float) -> str:  # a miss of less than a second said as such
        edge = drift_verdict(seconds) == "beyond" and seconds < DRIFT_MINUTES_GOAL * 60 + 1
        return "beyond, by less than a second," if edge else drift_verdict(seconds)

    verdict = verdict_of(t.measured_s)
    return (
        f"Then the pilot carried the local error on the run's share of its images "
        f"({pilot_local_samples(pilot, batch, local)} of {pilot}, as the run's batches carry it "
        f"on {local} of {batch}) instead of on {min(local, pilot)} of {pilot}: nothing read it "
        f"(the subset is sized on drift and MSE), and it slowed the pilot's K-way rate, which "
        f"the estimate takes for the instrumented phase. At commit {rec.commit} "
        f"(`{rec.about['command']}`, {rec.about['machine']}) the warm default run took "
        f"{minutes(t.measured_s)} minutes (`measured_s` {t.measured_s:.1f}; pilot "
        f"{minutes(ph['pilot'])}, instrumented {minutes(ph['instrumented'])}, remedies "
        f"{minutes(ph['remedies'])}, headline {minutes(ph['headline'])}, calibration curve "
        f"{minutes(ph['curve'])}), {c['chosen_images']} images: {verdict} the "
        f"{DRIFT_MINUTES_GOAL}-minute goal, against {minutes(tw.measured_s)} minutes at commit "
        f"{was.commit} (record drift-avx2-head; pilot {minutes(pw['pilot'])} minutes): the "
        f"pilot's {minutes(pw['pilot'] - ph['pilot'])} minutes are this change's, the other "
        f"phases, which this change did not touch, took "
        f"{abs(100 * (rest / rest_was - 1)):.0f} % {'more' if rest > rest_was else 'less'} time, "
        f"the machine's own movement. The "
        f"instrumented phase was estimated at {t.estimated_instrumented_s:.0f} s and took "
        f"{ph['instrumented']:.0f} s (before: {tw.estimated_instrumented_s:.0f} s estimated, "
        f"{pw['instrumented']:.0f} s taken). An hour later, at commit {again.commit} (whose "
        f"changes since touch none of the phases' forward passes), the same run on the same machine took "
        f"{minutes(ta.measured_s)} minutes ({verdict_of(ta.measured_s)} the goal; headline "
        f"{minutes(pa['headline'])} and calibration curve {minutes(pa['curve'])} minutes, "
        f"plain forwards both): whole runs here move between hours by more than the margin "
        f"to the goal, so on this machine the default run is at the goal's edge or beyond "
        f"it, not within it with room.")


def bench_drift_amx(records) -> str:
    """The drift group on an Intel CPU with AMX: the instrumentation's overhead with and
    without the local error, each goal row's verdict on its median's interval, and the
    layouts, which there run the other way than on the AVX2 machines."""
    rec = records("bench-drift-amx")
    if "amx_int8" not in rec.manifest["cpu"].get("cpu_flags", []):
        raise RecordError(f"record {rec.name}: its CPU has no AMX; record a bench run from one "
                          "with it")
    one, many = _overheads(rec)
    less = list(_without_local(rec).values())
    layouts = _layouts(rec)
    slower = [w for w, r, _ in layouts[:2] if r.median_lo > 1]

    def judged(r) -> str:
        return (f"{r.ratio_median:.2f}× (its median's {median_words(rec, r.pairs)} "
                f"{r.median_lo:.2f}–{r.median_hi:.2f}: {r.goal_verdict})")

    return (
        f"On an Intel CPU with AMX (`{rec.about['command']}`, commit {rec.commit}, "
        f"{rec.about['machine']}; {int(one.pairs)} pairs a goal row): `measure` {judged(one)} "
        f"its bare paired passes and `measure_many` {judged(many)} its bare K-way passes, "
        f"against the goal of {one.goal:g}×; without the local error "
        f"{_ratio_span(less[0], ' over the pairs')} and {_ratio_span(less[1])}. The plain forward "
        "ran channels_last against contiguous at "
        + "; ".join(f"{w} {m.group(1)} against {m.group(2)} images/s (time ratio "
                    f"{r.ratio_median:.3f}, {median_words(rec, r.pairs)} "
                    f"{r.median_lo:.3f}–{r.median_hi:.3f})" for w, r, m in layouts)
        + (f": channels_last, the default for float and deterministic passes (the AVX2 "
           f"machines' choice, above), is the slower layout here for "
           f"{' and '.join(slower)}; `QERROR_LAYOUT=contiguous` "
           "(`qerror.nn.models.forward_layout`) runs them contiguous." if slower else
           f": neither layout is shown the slower here for the float and truncation passes "
           f"({int(layouts[0][1].pairs)} pairs); `QERROR_LAYOUT=contiguous` "
           "(`qerror.nn.models.forward_layout`) runs them contiguous where a bench of one's own "
           "machine shows that faster."))


def bench_drift_local(records) -> str:
    """The instrumentation's overhead with and without the local error, from one bench run:
    how much of what is left above the goal the local error's own work is."""
    rec = records("bench-drift-avx512-local")
    _require_avx512(rec, "a bench run")
    one, many = _overheads(rec)
    less = _without_local(rec)
    rows = [(f"`{what}`", r) for what, r in less.items()]
    met = [w for w, r in rows if r.ratio_median <= one.goal]
    held = [w for w, r in rows if r.ratio_min <= one.goal <= r.ratio_max]
    straddle = ("both rows' ranges over their pairs contain it" if len(held) == 2 else
                f"{held[0]}'s range over its pairs contains it" if held else "")
    return (
        f"Where the rest lies (`{rec.about['command']}`, commit {rec.commit}, "
        f"{rec.about['machine']}; {int(one.pairs)} pairs a row): `measure` {_ratio_span(one)} "
        f"its bare paired passes and `measure_many` {_ratio_span(many)} its bare K-way passes; "
        f"the same measurements without the local error (`local_samples=0`), against the same "
        f"bare passes, {_ratio_span(less['measure'])} and {_ratio_span(less['measure_many'])}. "
        "The local error is each layer's quantized version run again on the first "
        "`local_samples` images of each batch of its float input, for each quantized "
        "network: a quantizer call, a convolution and its sums per layer and network, work "
        "the bare passes do not do (the activation quantizer's own error, taken on as many "
        "images of the quantized path, is then taken on one); it adds "
        f"{one.ratio_median - less['measure'].ratio_median:.2f} and "
        f"{many.ratio_median - less['measure_many'].ratio_median:.2f} to the medians. Without "
        f"it the goal of {one.goal:g}× is "
        + ("met by both" if len(met) == 2 else f"met by {met[0]} alone" if met else "not met")
        + " (on the medians"
        + (f"; {straddle}" if straddle else "") + "); with it, "
        + ("met" if max(one.ratio_median, many.ratio_median) <= one.goal else "not met") + ".")


def bench_drift_avx2_sums(records) -> str:
    """The instrumentation's overhead benched twice after the compiled sums, beside the bench
    before them; the sums' own rows (compiled loop against torch's reductions) from the
    second."""
    span = _ratio_span  # the median and its range over the pairs
    old = records("bench-drift-avx2-prepared")
    new, again = records("bench-drift-avx2-sums"), records("bench-drift-avx2-sums2")
    for rec in (new, again):
        _require_avx512(rec, "a bench run", present=False)
    (o1, om), (n1, nm), (a1, am) = _overheads(old), _overheads(new), _overheads(again)
    b = again.csv("bench.csv")
    b = b[(b.group == "drift") & (b.candidate == "difference_sums, compiled loop")]
    if len(b) != 2:
        raise RecordError(f"record {again.name}: expected two rows of the compiled sums")
    sums = []
    for r in b.itertuples():
        calls = re.match(r"(\d+) vs (\d+) µs a call", r.note)
        shape = re.search(r"output (\(.*?\)) of (\S+)", r.name)
        if not calls or not shape:
            raise RecordError(f"record {again.name}: a compiled-sums row lacks its shape or µs")
        sums.append(f"{r.ratio_median:.2f}× ({r.ratio_min:.2f}–{r.ratio_max:.2f}) on the "
                    f"output {shape.group(1)} of {shape.group(2)} ({calls.group(1)} against "
                    f"{calls.group(2)} µs a call)")


    met = [w for w, r in (("`measure`", a1), ("`measure_many`", am)) if r.ratio_median <= a1.goal]
    return (
        f"Benched after them (`{new.about['command']}`, commit {new.commit}, same machine "
        f"kind): `measure_many` {span(nm)} its bare K-way passes (before {om.ratio_median:.2f}×"
        f"), `measure` {span(n1)} its bare paired passes (before {o1.ratio_median:.2f}×); "
        f"again at commit {again.commit} (the sums' own rows added): `measure_many` "
        f"{span(am)}, `measure` {span(a1)}. The goal of {a1.goal:g}× is "
        + ("met by both" if len(met) == 2 else f"met by {met[0]} alone" if met
           else "not met")
        + "; the two runs' ranges over their pairs show how little five pairs resolve. The "
        "sums of one layer's float and quantized outputs (`qerror.nn.difference_sums`: the "
        "error's, both outputs' and their squares', per image and channel) took, compiled, "
        + " and ".join(sums) + " the time of torch's reductions.")


# The number of most extreme images a drift record's tail columns are defined by, for a
# record whose config does not name it (made before the config recorded tail_top):
# studies.drift.TAIL_TOP had this one value from its introduction (e2d501a) until then. A
# record that names its own is rendered with it.
DRIFT_UNRECORDED_TAIL_TOP = 5
# The power of a drift record whose manifest does not name it, one made before the study's
# config recorded resolve_power: studies.drift.RESOLVE_POWER had this one value from its
# introduction (fdd78e5) until then. A record that names its power is rendered with it.
DRIFT_UNRECORDED_POWER = 0.8


def drift_power(config: dict) -> float:
    """The power a drift record's image counts were chosen and stated for: its config's
    ``resolve_power``, or :data:`DRIFT_UNRECORDED_POWER` for a record made before the
    config named it."""
    return float(config.get("resolve_power", DRIFT_UNRECORDED_POWER))


def drift_tail_top(config: dict) -> int:
    """How many most extreme images a drift record's tail columns (``tail_top_share``,
    ``tail_top_clipped``, ``tail_top_in_rms_top``) count: its config's ``tail_top``, or
    :data:`DRIFT_UNRECORDED_TAIL_TOP` for a record made before the config named it."""
    return int(config.get("tail_top", DRIFT_UNRECORDED_TAIL_TOP))

_MODE_WORDS = {"nearest_even": "round-to-nearest-even", "nearest_away": "round-half-away",
               "toward_zero": "truncation", "floor": "floor", "stochastic": "stochastic rounding"}
_TARGET_WORDS = {"both": "weights and activations", "weights": "the weights alone",
                 "activations": "the activations alone"}


def _config(r) -> str:
    """"8-bit truncation of the weights alone"."""
    mode, target = _MODE_WORDS.get(r["mode"], r["mode"]), _TARGET_WORDS.get(r.target, r.target)
    return f"{int(r.bits)}-bit {mode} of {target}"


def _drift_row(prec: pd.DataFrame, rec: Record, mode: str, bits: int, target: str):
    frame = prec[prec.metric == "drift"]
    return _one_row(rec, frame, (frame["mode"] == mode) & (frame.bits == bits)
                    & (frame.target == target), f"drift row {mode} {bits} {target}")


def drift_subset(records) -> str:
    """What the pilot planned, what the chosen subset resolves, and how heavy the tail of one
    image's drift is (the drift record's ``pilot.csv``, ``precision.csv``, ``accuracy.csv``)."""
    rec = records("drift-subset")
    pilot, prec, acc = rec.csv("pilot.csv"), rec.csv("precision.csv"), rec.csv("accuracy.csv")
    cfg = rec.manifest["config"]
    n, low = int(cfg["chosen_images"]), int(cfg["min_images"])
    k = drift_tail_top(cfg)
    model = rec.manifest["model"]["metrics"]
    beyond = pilot[~pilot.within_max.astype(bool)]
    finite = pilot.need[np.isfinite(pilot.need)]
    top = pilot.loc[pilot.need.idxmax()]
    if len(beyond):
        chose = (f"{len(beyond)} configuration{'s' if len(beyond) > 1 else ''} ("
                 + "; ".join(f"{_config(r)}, {r.need:,.0f}" for _, r in beyond.iterrows())
                 + f") above the ceiling, so the subset took the ceiling, {n:,}")
    elif n == low:
        chose = f"so the subset took the floor, {n:,}"
    else:
        chose = (f"the largest {_config(top)}'s, rounded up to one significant figure: "
                 f"the subset took {n:,}")
    drift = prec[prec.metric == "drift"]
    more = drift[drift.images_to_resolve > n].sort_values("images_to_resolve")
    within = len(drift) - len(more)
    more_text = ("; those that need more: " + "; ".join(
        f"{_config(r)} ({r.images_to_resolve:,.0f})" for _, r in more.iterrows())
        if len(more) else "")
    parts = [
        f"In a recorded default run (`{rec.about['command']}`, commit {rec.commit}, "
        f"{rec.about['machine']}, at {pct(model['test_accuracy'])} % test accuracy; "
        f"`pilot.csv`, "
        f"`precision.csv`, `accuracy.csv`) the pilot's needs ran from {finite.min():,.0f} to "
        f"{pilot.need.max():,.0f} images, {chose}. Measured on those {n:,}, the median "
        f"layer's drift needs at most {n:,} images for {100 * drift_power(cfg):.0f} % "
        f"power in {within} of the "
        f"{len(drift)} configurations{more_text}."]
    near, trunc = (_drift_row(drift, rec, m, 8, "both") for m in ("nearest_even",
                                                                    "toward_zero"))
    plan = _one_row(rec, pilot, (pilot["mode"] == "nearest_even") & (pilot.bits == 8)
                    & (pilot.target == "both"), "pilot row nearest_even 8 both")
    four = drift[drift.bits == 4].tail_top_share
    parts.append(
        f"\n\nThe pilot planned {plan.need_drift:,.0f} images for 8-bit round-to-nearest-even "
        f"of weights and activations, against {near.images_to_resolve:,.0f} measured on the "
        f"subset, and `precision.csv` shows how heavy the tail of one image's drift is: at the "
        f"median layer of that configuration the {k} most extreme of the {n:,} "
        f"images carry "
        f"{100 * near.tail_top_share:.0f} % of the per-image drift's variance (excess kurtosis "
        f"{near.tail_kurtosis:.0f}), where {k} normal values of {n:,} carry "
        f"{100 * near.tail_top_share_normal:.0f} %; under 8-bit truncation "
        f"{100 * trunc.tail_top_share:.0f} %, and at 4 bits {100 * four.min():.0f} to "
        f"{100 * four.max():.0f} % across modes and targets.")
    weights = _drift_row(drift, rec, "toward_zero", 8, "weights")
    rows = ((near, "round-to-nearest-even"), (trunc, "truncation"))
    clipped = "; ".join(
        f"{label}: {100 * r.tail_clipped_share:.1f} % of the images clamped at or before the "
        f"median layer, {int(r.tail_top_clipped)} of its {k} most extreme among "
        f"them, and "
        f"without the clamped images the {k} most extreme of the rest carry "
        f"{100 * r.tail_top_share_unclipped:.0f} % (normal: "
        f"{100 * r.tail_top_share_unclipped_normal:.0f} %)" for r, label in rows)
    parts.append(
        f" Clamping by a calibrated range (`tail_clipped_share`, `tail_top_clipped`, "
        f"`tail_top_share_unclipped`), weights and activations at 8 bits: {clipped}. "
        f"Truncating the weights alone, which clamps nothing: "
        f"{100 * weights.tail_top_share:.0f} % (excess kurtosis {weights.tail_kurtosis:.0f}).")
    rel = "; ".join(
        f"{label} {100 * r.tail_top_share:.0f} % to {100 * r.tail_top_share_relative:.0f} %, "
        f"{int(r.tail_top_in_rms_top)} of {k}" for r, label in
        ((weights, "truncating the weights alone"), (trunc, "truncating both"),
         (near, "round-to-nearest-even of both")))
    parts.append(
        f" Divided by each image's float RMS at the layer (`tail_top_share_relative`), and "
        f"how many of the {k} most extreme images are among the "
        f"{2 * k} with the largest float RMS (`tail_top_in_rms_top`; about "
        f"{2 * k**2 / n:.1f} if the two were unrelated): {rel}.")
    base = acc[acc.remedy == "none"]
    unresolved = int((~base.differs.astype(bool)).sum())
    parts.append(
        f"\n\nThe accuracy table resolves differences from float of "
        f"{100 * base.detectable.min():.1f} to {100 * base.detectable.max():.1f} points on "
        f"the {n:,} images, and {unresolved} of its {len(base)} are not resolved there: the "
        "eight-bit comparisons run on the whole test split instead (`headline.csv`).")
    return "".join(parts)


def bench_fused(records) -> str:
    rec = records("bench-fake-quantize")
    b = rec.csv("bench.csv")
    fused = b[b.candidate.str.startswith("fused")]
    away = fused.name.str.contains("nearest_away")
    exact = b[(b.candidate == "qerror") & ~b.name.str.contains("stochastic|reciprocal")]
    size = int(fused.name.str.extract(r"per-tensor, (\d+) ")[0].dropna().iloc[0])
    return (f"`{rec.about['command']}` ({rec.about['machine']}, commit {rec.commit}, "
            f"2^{size.bit_length() - 1} float32 values, medians of paired timings) times it "
            f"at {span(fused[~away].ratio_median)} of the block engine per mode "
            f"({span(fused[away].ratio_median)} for nearest-away), and the exact "
            "deterministic modes (nearest-away included, per tensor and per channel) at "
            f"{span(exact.ratio_median)} of PyTorch's own nearest-even fake-quantize kernel, "
            "which is not exact.")


IMAGENET_VAL_IMAGES = 50_000  # ILSVRC2012's validation split


def imagenet_throughput(records) -> str:
    """The drift study's rates at ImageNet size (scripts/imagenet-throughput.sh's run), and
    what the whole validation split at the default configurations would take at them."""
    rec = records("imagenet-throughput")
    t = rec.csv("timing.csv").iloc[0]
    default = int(records("drift-avx2").csv("timing.csv").iloc[0].configurations)
    cfg = rec.manifest["config"]
    local = ("each of which carries the local error" if cfg["local_samples"] >= t.probe_images
             else f"{cfg['local_samples']} of which carry the local error")
    days = IMAGENET_VAL_IMAGES * default / t.images_per_s_per_config / 86400
    return (f"`{rec.about['command']}` (commit {rec.commit}, {rec.about['machine']}) ran the "
            f"study on that folder: the instrumented paired pass of one configuration at "
            f"{t.measure_images_per_s:.3g} images/s and its plain quantized forward at "
            f"{t.plain_images_per_s:.3g} images/s (`measure_images_per_s`, "
            f"`plain_images_per_s` in `timing.csv`, timed on a first batch of "
            f"{int(t.probe_images)} images, {local}), and the estimate's "
            f"rate for each configuration with a width's configurations in one K-way batch, "
            f"{t.images_per_s_per_config:.3g} images/s (`images_per_s_per_config`, modelled "
            f"from those rates with a fixed `--images`). At that rate the "
            f"{IMAGENET_VAL_IMAGES:,} validation images × the {default} default "
            f"configurations would take about {days:.0f} days on one such CPU, hence "
            "`--images`, a GPU and torchrun.")


def _one_row(rec: Record, frame: pd.DataFrame, mask, what: str) -> pd.Series:
    """The one row of ``frame`` that ``mask`` selects; a RecordError naming ``what`` when the
    record holds none or several."""
    hit = frame[mask]
    if len(hit) != 1:
        raise RecordError(f"record {rec.name}: {len(hit)} rows of {what}, expected one")
    return hit.iloc[0]


def bench_drift(records) -> str:
    """The drift bench's memory rows and its instrumentation overhead against like work."""
    rec = records("bench-drift")
    b = rec.csv("bench.csv")
    b = b[b.group == "drift"]

    def row(name_has: str, baseline: str) -> pd.Series:
        return _bench_row(rec, b, name_has, baseline)

    mem, one, many = (row(name, "float forward") for name in (
        "default passes of 128", "one paired pass", "modes, default passes"))
    mib = re.findall(r"(\d+) MiB", mem.note)
    k = int(re.search(r"(\d+) modes", many["name"]).group(1))

    def timed(name_has: str, baseline: str) -> str:
        r = row(name_has, baseline)
        verdict = "met" if str(r.meets_goal) == "True" else "not met"
        if isinstance(r.get("goal_verdict"), str):  # a record from after the bench decided
            # its goals on the interval of the median
            verdict = (f"{r.goal_verdict} (the median's {median_words(rec, r.pairs)} "
                       f"{r.median_lo:.2f}–{r.median_hi:.2f})" if r.goal_verdict != "not "
                       "resolved" or math.isfinite(r.median_lo) else
                       f"{r.goal_verdict} (too few pairs for an interval of the median)")
        return (f"{r.ratio_median:.2f}× ({r.ratio_min:.2f}–{r.ratio_max:.2f} over "
                f"{int(r.pairs)} paired timings; goal {r.goal:g}×: {verdict})")
    return (
        f"`{rec.about['command']}` ({rec.about['machine']}, commit {rec.commit}, ResNet50, a "
        f"batch of 256 images at 1×32×32, each in a fresh process, measured on a second "
        f"call): the peak resident memory of `measure` with its default passes grows by "
        f"{mem.ratio_median:.2f}× the float forward's ({mib[0]} MiB against {mib[1]}), "
        f"by {one.ratio_median:.2f}× in one paired pass, and that of `measure_many` over the "
        f"{k} modes of a width by {many.ratio_median:.2f}× (goal: at most {mem.goal:g}×). The "
        f"instrumented pass took "
        f"{timed('8-bit toward_zero', 'paired passes, no statistics')} the time of the same "
        f"paired passes without statistics, and `measure_many` "
        f"{timed('modes (', f'the same {k}-way passes, no statistics')} that of the same "
        f"{k}-way passes without statistics.")


def drift_fused_gain(records) -> str:
    """The whole drift run with and without the fused quantizer, against the bench's ratios
    of the quantizer alone (record bench-fake-quantize): smaller, larger or within."""
    fused = records("drift").csv("timing.csv").iloc[0].measured_s
    block = records("drift-block-engine").csv("timing.csv").iloc[0].measured_s
    b = records("bench-fake-quantize").csv("bench.csv")
    alone = b[b.candidate.str.startswith("fused")].ratio_median
    ratio = fused / block
    what = ("it was slower" if fused > block else "it gained nothing" if fused == block else
            "the gain is smaller" if ratio > alone.max() else
            "the gain is larger" if ratio < alone.min() else "the gain is about the same")
    return (f"In a whole study {what}: the default drift run took {fused:.0f} s "
            f"with it and {block:.0f} s without (timed in the last section).")


def rounding_choice_time(records) -> str:
    rec = records("rounding_choice")
    goals = rec.csv("goals.csv")
    timing = rec.csv("timing.csv")
    stage = timing.groupby("stage", sort=False).seconds.sum()
    whole = goals[goals.goal.str.startswith("whole run")].iloc[0].measured
    updown = stage[[s for s in stage.index if s.startswith("up or down")]].sum()
    # goals.csv's figure is float's accuracy minus AdaRound's (and nearest's): a loss, which
    # is negative where AdaRound is above float
    ada = {g.goal.split(":")[0]: f"{g.measured}, {'met' if str(g.met) == 'True' else 'not met'}"
           for g in goals.itertuples() if "AdaRound" in g.goal}
    return (
        f"The default run took {whole.replace(' min', ' minutes')} (`goals.csv`, commit "
        f"{rec.commit}) on {rec.about['machine']}, {rec.about['kernels']} "
        f"(`{rec.about['environment']}`): {minutes(stage['test accuracy'])} of them for the "
        f"whole-test-split accuracies, {minutes(stage['AdaRound'])} for AdaRound, "
        f"{minutes(updown)} for the up/down experiment, {minutes(stage['training'])} for "
        f"training the small CNN. 4-bit AdaRound's loss against float (`goals.csv`: float's "
        f"accuracy minus AdaRound's, negative where AdaRound is the more accurate; the goal "
        f"at most one point): "
        + "; ".join(f"{model}, {text}" for model, text in ada.items()) + ".")


def early_exit_run(records, name: str = "early_exit", lead: str = "A default run") -> str:
    rec = records(name)
    goals = rec.csv("goals.csv")
    cpu = rec.manifest.get("cpu", {}).get("cpu_capability")
    items = [f"- {g.goal}: **{g.verdict}** ({g.measured})." for g in goals.itertuples()]
    return (f"{lead} took {minutes(rec.manifest['seconds'])} minutes "
            f"({rec.manifest['seconds']:.0f} s, `{rec.about['command']}`, commit {rec.commit}) "
            f"on {rec.about['machine']}" + (f" (ATen's {cpu} kernels)" if cpu else "")
            + ". Its goals (`goals.csv`):\n\n" + "\n".join(items))


def early_exit_avx2(records) -> str:
    """The default early-exit run on an AVX2-only CPU, and how its simulated and real INT8
    networks agree there."""
    rec = records("early-exit-avx2")
    sim = rec.csv("sim_vs_real.csv").set_index("simulation")
    if not {"int8_runner", "nearest_even"} <= set(sim.index):
        raise RecordError(f"record {rec.name}: sim_vs_real.csv lacks the int8_runner or the "
                          "nearest_even row")
    real, near = sim.loc["int8_runner"], sim.loc["nearest_even"]
    agree = (f"The real INT8 runner, which drops exited images between its compiled stages, "
             f"made the same exit decision as every stage run on whole batches on "
             f"{pct(real.same_exit)} % of the test images and the same prediction on "
             f"{pct(real.same_prediction)} %; the simulated 8-bit nearest-even network agreed "
             f"with the real INT8 one on {pct(near.same_exit)} % of exits and "
             f"{pct(near.same_prediction)} % of predictions (`sim_vs_real.csv`).")
    return early_exit_run(records, "early-exit-avx2",
                          "On a CPU with AVX2 only, a default run") + "\n\n" + agree


_EE_RUNS = (("early_exit", "default (seed 0)"), ("early-exit-seed1", "seed 1"),
            ("early-exit-seed2", "seed 2"), ("early-exit-retrained", "default, trained again"),
            ("early-exit-fresh", "default, trained on a fresh machine"))


@dataclass(frozen=True)
class EarlyExitVerdict:
    """The INT8 early exit against FP32 full across the early-exit records
    (:data:`_EE_RUNS`): how many baselines, the TOST margin (a fraction), on how many the
    interval's lower end is above minus the margin (non-inferior), on how many both
    one-sided tests pass (equivalent), and whether every failed equivalence failed on its
    upper side alone (the early exit possibly better than FP32 full by more than the
    margin). ``records``: each record's name and commit."""

    baselines: int
    margin: float
    non_inferior: int
    equivalent: int
    fails_upper_only: bool
    lowest: float
    records: tuple[tuple[str, str], ...]


def _ee_head(rec: Record) -> pd.Series:
    """The early-exit record's headline operating point: the INT8 early exit under the
    rule its run chose."""
    summary = rec.json("summary.json")
    pts = rec.csv("operating_points.csv")
    return pts[(pts.system == "int8_early_exit")
               & (pts.policy == summary["head_policy"])].iloc[0]


def early_exit_verdict(records) -> EarlyExitVerdict:
    """:class:`EarlyExitVerdict` of the early-exit records, read through ``records``
    (:func:`record_reader`)."""
    margin = {float(records(n).manifest["config"]["margin"]) for n, _ in _EE_RUNS}
    if len(margin) != 1:
        raise RecordError(f"the early-exit records disagree on the TOST margin: {sorted(margin)}")
    margin = margin.pop()
    heads = [(records(n), _ee_head(records(n))) for n, _ in _EE_RUNS]
    for rec, h in heads:  # a NaN compares as False: it would count as a failed test
        for column in ("tost_ci_lo", "tost_p"):
            if not math.isfinite(h[column]):
                raise RecordError(f"record {rec.name}: operating_points.csv holds {h[column]} "
                                  f"as its headline rule's {column}: the record does not hold "
                                  "the figure the verdict counts")
    lows = [h.tost_ci_lo for _, h in heads]
    passes = [h.tost_p < float(rec.manifest["config"]["alpha"]) for rec, h in heads]
    return EarlyExitVerdict(
        baselines=len(heads), margin=margin, non_inferior=sum(lo > -margin for lo in lows),
        equivalent=sum(passes),
        fails_upper_only=all(ok or lo > -margin for ok, lo in zip(passes, lows)),
        lowest=min(lows), records=tuple((rec.name, rec.commit) for rec, _ in heads))


def tost_p(p: float, alpha: float) -> str:
    """A TOST p-value to three decimals, or more where three would print it on the other
    side of ``alpha``, the level its verdict is judged at: 0.0496 at α = 0.05 is 0.0496,
    not 0.050."""
    p = _finite(p)
    return f"{p:.{places_for(p, lambda v: v < alpha, lambda n: f'{p:.{n}f}', 3)}f}"


def early_exit_seeds(records) -> str:
    heads_text, joint_gain, rows, deltas = [], [], [], []
    commits = sorted({records(n).commit for n, _ in _EE_RUNS})
    for name, label in _EE_RUNS:
        rec = records(name)
        head = _ee_head(rec)
        alpha = float(rec.manifest["config"]["alpha"])
        goals = rec.csv("goals.csv")
        heads = rec.csv("heads.csv")
        test = heads[heads.split == "test"].set_index(["variant", "exit"]).accuracy
        variant = rec.manifest["config"]["variant"]
        last = int(heads.exit.max())
        mid = [test[(variant, k)] for k in (last - 2, last - 1)]
        heads_text.append((label, mid, test[(variant, last)]))
        if ("joint", last) in test.index and ("frozen", last) in test.index:
            joint_gain.append((test[("frozen", last)], test[("joint", last)]))
        others = goals.iloc[1:]
        met = "met" if others.met.astype(str).eq("True").all() else \
            f"{int(others.met.astype(str).eq('True').sum())} of {len(others)} met"
        deltas.append(head.delta_vs_fp32_full)
        rows.append(f"| {label} | {rec.commit} | {points(head.delta_vs_fp32_full)} "
                    f"[{points(head.tost_ci_lo)}, {points(head.tost_ci_hi)}] | "
                    f"{tost_p(head.tost_p, alpha)} | {100 * head.macs_fraction:.1f} % | "
                    f"{met} |")
    better = sum(all(m > lastacc for m in mid) for _, mid, lastacc in heads_text)
    listing = "; ".join(f"{label}: {pct(mid[0])} % and {pct(mid[1])} % against {pct(lastacc)} %"
                        for label, mid, lastacc in heads_text)
    gains = [b - a for a, b in joint_gain]
    lo_gain, hi_gain = points(min(gains or [0])), points(max(gains or [0]))
    joint = (f" One epoch of joint fine-tuning moves the last exit by {lo_gain}"
             + ("" if lo_gain == hi_gain else f" to {hi_gain}")
             + f" points ({pct(joint_gain[0][0])} → {pct(joint_gain[0][1])} % on the default "
             "baseline)." if gains else "")
    v = early_exit_verdict(records)
    m = f"{100 * v.margin:g}"
    tost = level(1 - 2 * common_alpha(records(n) for n, _ in _EE_RUNS))  # its CI's level
    verdict = (f"non-inferiority at the {m}-point margin on every one"
               if v.non_inferior == v.baselines
               else f"non-inferiority at the {m}-point margin not shown on "
               f"{v.baselines - v.non_inferior} of them")
    again = records("early-exit-retrained").manifest["model"]
    fresh = records("early-exit-fresh").manifest["model"]
    return (
        f"What the runs found (`python -m studies.early_exit`, and with `--checkpoint` for two "
        "more baselines trained the same way, `python -m studies.train --seed 1` and `--seed "
        "2`; then on the default baseline trained again by a later commit, the cached one of "
        f"the last run ({pct(again['metrics']['test_accuracy'])} % test accuracy against the "
        f"first's {pct(records('early_exit').manifest['model']['metrics']['test_accuracy'])} "
        f"%; checkpoint sha256 {again['sha256'][:12]}), and once more on a machine that had "
        f"no baseline cached, which trained it first ({pct(fresh['metrics']['test_accuracy'])}"
        f" %; sha256 {fresh['sha256'][:12]}); commit"
        f"{'s' if len(commits) > 1 else ''} {', '.join(commits)}, "
        f"{records(_EE_RUNS[0][0]).about['machine']}; each run's `heads.csv`, "
        "`operating_points.csv` and `goals.csv`). The heads at the ends of the two stages "
        f"before the last score higher on the test split than the backbone's own last layer "
        f"on {better} of the {len(_EE_RUNS)} baselines ({listing}; point estimates, with "
        f"McNemar's test against the last exit in `heads.csv`).{joint} The INT8 early-exit "
        f"network against FP32 full (paired, {tost} % interval of the TOST) and the other "
        "four goals:\n\n"
        f"| baseline | commit | INT8 early exit − FP32 full ({tost} % CI), points | TOST p | "
        "MACs | other four goals |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"The lower end of the interval is above −{m} points on {v.non_inferior} of the "
        f"{v.baselines} baselines (lowest {points(v.lowest)}): {verdict}; the estimates "
        f"range from {points(min(deltas))} to {points(max(deltas))} points. The equivalence "
        f"test itself (both one-sided tests) passes on {v.equivalent} of the {v.baselines}"
        + (": where it fails, its upper side does, the early exit possibly better than FP32 "
           "full by more than the margin." if v.fails_upper_only
           and v.equivalent < v.baselines else "."))


def dataset_equivalence(records) -> str:
    rec = records("dataset")
    eq = rec.csv("equivalence.csv")
    m = {r.metric: r.value for r in eq[eq.comparison
                                       == "quantizer_in_model_vs_offline_codes"].itertuples()}
    var = rec.csv("offline_variants.csv")
    own = var[var.variant == "model"].iloc[0]
    model = rec.manifest["model"]

    def test(v) -> str:
        # a variant whose codes are the model's own compares two identical inputs: the
        # study leaves it out of Holm's family, with no adjusted p
        if math.isnan(v.mcnemar_p_holm) and v.frac_codes_changed == 0:
            return "the model's own codes: a check, no McNemar test"
        return f"Holm-adjusted McNemar p {pvalue(v.mcnemar_p_holm)} against the model's own"

    others = "; ".join(
        f"{v.how}: {100 * v.frac_codes_changed:.2f} % of the codes changed, "
        f"{int(v.prediction_changes)} predictions changed, accuracy {pct(v.accuracy)} % "
        f"({test(v)})"
        for v in var[var.variant != "model"].itertuples())
    return (
        f"In the default run (`{rec.about['command']}`, commit {rec.commit}, "
        f"{rec.manifest['seconds']:.0f} s on {rec.about['machine']}; its baseline, sha256 "
        f"{model['sha256'][:8]}…, {rec.about['baseline']}, test accuracy "
        f"{pct(model['metrics']['test_accuracy'])} %) the two networks "
        f"received different values in {int(m['differing_input_elements']):,} of the "
        f"{int(m['input_elements']):,} input elements of the {int(m['images']):,} test images "
        f"and gave different logits in {int(m['differing_logit_elements']):,} of "
        f"{int(m['logit_elements']):,} (`equivalence.csv`). With the model's own parameters "
        f"the accuracy is {pct(own.accuracy)} %; offline codes made otherwise "
        f"(`offline_variants.csv`): {others}.")


def compression_sparse_long(records) -> str:
    """The sparse goal judged on a run with ten times the default fine-tuning."""
    rec = records("compression-sparse-2000")
    pts = rec.csv("points.csv")
    config = rec.manifest["config"]
    steps = int(config["finetune_steps"])
    default = records("compression").manifest["config"]
    default_steps = int(default["finetune_steps"])
    # the default run fine-tunes the dense network, each sparsity and each channel fraction
    tunings = 1 + len(default["sparsities"]) + len(default["channel_fractions"])
    if config["sparsities"] != [0.9]:
        raise RecordError(f"record {rec.name}: expected the 90 % sparsity alone, got "
                          f"{config['sparsities']}")

    def one(method, cfg):
        return _one_row(rec, pts, (pts.method == method) & (pts.config == cfg),
                        f"{method} ({cfg})")

    base, tuned = one("dense float32", "dense"), one("dense float32, fine-tuned", "dense")
    sparse, sparse8 = one("pruned", "90% sparse"), one("pruned + INT8", "90% sparse")
    goal = rec.csv("goals.csv")
    verdict = goal[goal.goal.str.startswith("90%-sparse")].verdict.iloc[0]
    vs_tuned = sparse.acc - tuned.acc
    alpha = float(config["alpha"])
    better = (sparse.delta_vs_dense > 0 and sparse.p_vs_dense < alpha and vs_tuned > 0
              and sparse.p_vs_dense_finetuned < alpha)
    timing = rec.csv("timing.csv").set_index("task").seconds
    tune_s, prune_s = timing["dense fine-tuned"], timing["pruned 0.9"]
    hours = tunings * (tune_s + prune_s) / 2 / 3600
    model = rec.manifest["model"]
    other = model["sha256"] != records("compression").manifest["model"]["sha256"]
    return (
        f"**The sparse goal, measured** on the test split with {steps / default_steps:g} "
        f"times the default fine-tuning (`{rec.about['command']}`, commit {rec.commit}, "
        f"{rec.manifest['seconds'] / 60:.0f} minutes on {rec.about['machine']}"
        + (f"; its baseline is another checkpoint than the default run's, sha256 "
           f"{model['sha256'][:12]}" if other else "")
        + "): the "
        f"90 %-sparse network reaches {accuracy_ci(sparse)} against the baseline's "
        f"{pct(base.acc)} % "
        f"({points(sparse.delta_vs_dense)} points, McNemar p "
        f"{pvalue(sparse.p_vs_dense, alpha)}) and "
        f"the dense network fine-tuned the same {steps} steps {pct(tuned.acc)} % "
        f"({points(vs_tuned)} points, p {pvalue(sparse.p_vs_dense_finetuned, alpha)}); "
        "with its "
        f"surviving weights in INT8, {pct(sparse8.acc)} % in {int(sparse8.bytes):,} bytes "
        f"against the dense file's {int(base.bytes):,}. The goal (within one point of both) "
        f"is {verdict}" + ("; the pruned network is better than either (McNemar, above)"
                           if better else "") + ". "
        f"Fine-tuning alone adds {points(tuned.acc - base.acc)} points to the baseline. The "
        f"default run keeps {default_steps} steps, since at {steps} its {tunings} "
        f"fine-tunings would take about {hours:.0f} hours of one thread ({tune_s / 60:.0f} and "
        f"{prune_s / 60:.0f} minutes for the two here, each with its test-split evaluation "
        f"and latency): it judges the goal at {default_steps} steps, this run at {steps}.")


def _dwn_rows(rec: Record) -> pd.DataFrame:
    """The DWN points of a compression run, largest first."""
    pts = rec.csv("points.csv")
    dwn = pts[pts.method == "DWN"].sort_values("bytes", ascending=False)
    if dwn.empty:
        raise RecordError(f"record {rec.name}: no DWN point in points.csv")
    return dwn


def compression_dwn(records) -> str:
    """The DWN goal on the default (exponential EFD) run, set against the paper's harmonic
    decay run from the same commit, and the validation-to-test gap."""
    rec, harm = records("compression-dwn"), records("compression-dwn-harmonic")
    dwn, hdwn = _dwn_rows(rec), _dwn_rows(harm)
    for run, frame in ((rec, dwn), (harm, hdwn)):
        efd = set(frame.efd)
        if len(efd) != 1:
            raise RecordError(f"record {run.name}: its DWN points mix EFD decays {efd}")
    if dwn.efd.iloc[0] != "exponential" or hdwn.efd.iloc[0] != "harmonic":
        raise RecordError("records compression-dwn and compression-dwn-harmonic: expected "
                          "the exponential and the harmonic EFD decay")
    big, small = dwn.iloc[0], dwn.iloc[-1]
    hbig, hsmall = hdwn.iloc[0], hdwn.iloc[-1]
    goal = rec.csv("goals.csv")
    verdict = goal[goal.goal.str.startswith("DWN")].verdict.iloc[0]
    within = dwn[dwn.bytes <= 100_000]
    why = ""
    if verdict == "not met" and (within.acc_hi < 0.89).all():
        why = ": the interval's upper end is below it"
    neither = "neither meets the goal" if max(big.acc, hbig.acc) < 0.89 else \
        "one meets the goal" if min(big.acc, hbig.acc) < 0.89 else "both meet the goal"
    base = records("compression").manifest["model"]["metrics"]
    gap, base_gap = big.val_acc - big.acc, base["val_accuracy"] - base["test_accuracy"]
    return (
        f"**The DWN goal, measured** (`{rec.about['command']}`, commit {rec.commit}, "
        f"{rec.about['machine']}, {minutes(rec.manifest['seconds'])} minutes for both "
        f"networks): the DWN of {big.config.split(',')[0].removeprefix('LUTs ')} LUTs "
        f"({int(big.bytes):,} bytes) reaches {accuracy_ci(big)} on the test split, the one of "
        f"{small.config.split(',')[0].removeprefix('LUTs ')} LUTs ({int(small.bytes):,} "
        f"bytes) {accuracy_ci(small)}. The goal (at least 89 % within 100 kB) is {verdict}"
        f"{why}. The sizes, the temperature rule and the epochs were chosen on the validation "
        "split; so was the EFD decay, but only after a test figure had been seen: the "
        "paper's harmonic decay was run first and its test accuracy read, then the "
        "exponential decay of the authors' code was written and chosen on validation alone. "
        + (f"Both from one commit ({harm.commit}, `{harm.about['command']}` for the paper's): "
           if harm.commit == rec.commit else
           f"The paper's from commit {harm.commit} (`{harm.about['command']}`): ") + "the "
        f"larger network {pct(big.val_acc)} % on validation with the exponential decay "
        f"against {pct(hbig.val_acc)} % with the harmonic, {accuracy_ci(big)} against "
        f"{accuracy_ci(hbig)} on test; the smaller {pct(small.val_acc)} % against "
        f"{pct(hsmall.val_acc)} % on validation, {accuracy_ci(small)} against "
        f"{accuracy_ci(hsmall)} on test (one seed each, the best of "
        f"{rec.manifest['config']['dwn_epochs']} epochs by validation accuracy). Both test "
        f"results are reported; {neither}. The test split sits {100 * gap:.2f} points below "
        f"the validation split for the larger network, and {100 * base_gap:.2f} for the ResNet "
        f"baseline (its metrics in the default compression run's manifest: "
        f"{pct(base['val_accuracy'])} % against {pct(base['test_accuracy'])} %), so 89 % on "
        f"test would need about {89 + 100 * gap:.0f} % on validation.")


RENDERERS: dict[str, Callable] = {
    "baseline-train": baseline_train,
    "baseline-train-avx2": baseline_train_avx2,
    "stem-frontier": stem_frontier,
    "compression-table": compression_table,
    "compression-goals": compression_goals,
    "compression-dwn": compression_dwn,
    "compression-sparse-2000": compression_sparse_long,
    "dataset-equivalence": dataset_equivalence,
    "drift-time": drift_time,
    "drift-time-avx2": drift_time_avx2,
    "drift-speed-avx2": drift_speed_avx2,
    "drift-speed-avx2-next": drift_speed_avx2_next,
    "drift-speed-avx2-prepared": drift_speed_avx2_prepared,
    "bench-drift-avx2-next": bench_drift_avx2_next,
    "bench-drift-avx2-prepared": bench_drift_avx2_prepared,
    "drift-speed-avx2-sums": drift_speed_avx2_sums,
    "bench-drift-avx2-sums": bench_drift_avx2_sums,
    "bench-drift-avx512": bench_drift_avx512,
    "bench-drift-local": bench_drift_local,
    "bench-drift-amx": bench_drift_amx,
    "drift-time-avx2-head": drift_time_avx2_head,
    "drift-time-avx2-pilot": drift_time_avx2_pilot,
    "bench-layout-avx2": bench_layout_avx2,
    "drift-subset": drift_subset,
    "early-exit-run": early_exit_run,
    "early-exit-avx2": early_exit_avx2,
    "early-exit-seeds": early_exit_seeds,
    "drift-fused-gain": drift_fused_gain,
    "bench-fused": bench_fused,
    "imagenet-throughput": imagenet_throughput,
    "bench-drift": bench_drift,
    "rounding-choice-time": rounding_choice_time,
}


# --------------------------------------------------------------------------- settings

# A setting the README's prose states (a test's level, a power) is the code's, not a run's:
# it sits inline, <!-- setting: NAME -->VALUE<!-- /setting -->, and is written from the
# constant that sets it, so that --check fails where the constant changed and the words did
# not. A figure a run measured is a record passage's, above.
_SETTING = re.compile(r"<!-- setting: ([a-z0-9-]+) -->([^<\n]*)<!-- /setting -->")


def subscript(text: str) -> str:
    """Digits in Unicode subscripts, a point kept: "0.95" -> "₀.₉₅"."""
    return text.translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


#: Each inline setting of the README, from the constant of the study that uses it.
SETTINGS: dict[str, Callable[[], str]] = {
    # the level of the early-exit study's tests (studies.early_exit.ALPHA)
    "early-exit-alpha": lambda: f"{EARLY_EXIT_ALPHA:g}",
    # the normal quantile its one-sided tests clear, z_(1 - alpha)
    "early-exit-z": lambda: "z" + subscript(f"{round(1 - EARLY_EXIT_ALPHA, 6):g}"),
    # the confidence of the compression study's Wilson intervals
    "compression-level": lambda: level(1 - COMPRESSION_ALPHA),
    # the power with which the drift study chooses and states its image counts
    "drift-power": lambda: level(DRIFT_RESOLVE_POWER),
    # how many most extreme images its tail shares count
    "drift-tail-top": lambda: count(DRIFT_TAIL_TOP),
    # what ResNet50's per-image statistics and images take at the README's ImageNet
    # commands' 49,800 images (imagenet_memory): one configuration's kept image means,
    # the BatchNorm moments, the commands' two configurations at their resampled images,
    # and the images as 8-bit pixels
    **{f"imagenet-{part}-gib": (lambda part=part: f"{imagenet_memory()[part] / 2 ** 30:.1f} GiB")
       for part in ("kept", "bn", "resampled", "pixels")},
}

#: The README's ImageNet commands: images measured (the validation set's 50,000 less 200
#: calibration images) and images resampled (--resample-images).
IMAGENET_IMAGES, IMAGENET_RESAMPLED = 49_800, 5_000


def imagenet_memory() -> dict[str, int]:
    """Bytes of the drift study's per-image statistics and images for torchvision's ResNet50
    at the README's ImageNet commands' :data:`IMAGENET_IMAGES`: ``kept``, one configuration's
    kept image means (:func:`studies.drift.kept_means_bytes`); ``bn``, the BatchNorm moments
    of one configuration that decides the network claims
    (:func:`qerror.nn.seeds.bn_moments_bytes`); ``resampled``, both for the commands' two
    configurations (nearest_even and toward_zero, 8 bits, both) at
    :data:`IMAGENET_RESAMPLED` images (:func:`studies.drift.resampled_bytes`); ``pixels``,
    the measured images as 8-bit pixels at 224×224 (:func:`studies.drift.imagenet_pixel_bytes`).
    """
    model = torchvision.models.resnet50()
    configs = [QuantConfig.make(8, m, "both") for m in ("nearest_even", "toward_zero")]
    return {"kept": kept_means_bytes(model, configs[:1], IMAGENET_IMAGES),
            "bn": bn_moments_bytes(model, IMAGENET_IMAGES),
            "resampled": resampled_bytes(model, configs, IMAGENET_RESAMPLED),
            "pixels": IMAGENET_IMAGES * imagenet_pixel_bytes(224)}


def render_settings(text: str) -> tuple[str, list[str]]:
    """``text`` with every inline setting written from its constant, and the problems found
    (an unknown name, a marker the pattern cannot read, a setting no marker uses)."""
    problems: list[str] = []
    seen: set[str] = set()

    def one(m: re.Match) -> str:
        name = m.group(1)
        seen.add(name)
        if name not in SETTINGS:
            problems.append(f"README setting '{name}' has no entry in paper/readme.py's "
                            "SETTINGS")
            return m.group(0)
        return f"<!-- setting: {name} -->{SETTINGS[name]()}<!-- /setting -->"

    out = _SETTING.sub(one, text)
    bare = _SETTING.sub("", re.sub(r"`[^`\n]*`", "", text))  # quoted markers are prose
    problems += [f"README marker {m.group(0)!r} is not part of '<!-- setting: NAME -->VALUE"
                 "<!-- /setting -->' on one line: its value is never written nor checked"
                 for m in re.finditer(r"<!--\s*/?\s*setting\b[^>]*-->", bare)]
    problems += [f"setting '{n}' has no place in the README (<!-- setting: {n} -->)"
                 for n in SETTINGS if n not in seen]
    return out, problems


def differing_settings(old: str, new: str) -> list[str]:
    """Names of the inline settings whose value differs between two versions of the README."""
    return sorted({a.group(1) for a, b in zip(_SETTING.finditer(old), _SETTING.finditer(new))
                   if a.group(2) != b.group(2)})


# --------------------------------------------------------------------------- the README

WIDTH = 95  # the README's prose is wrapped at about this width


def wrap(body: str) -> str:
    """Prose paragraphs and list items wrapped at :data:`WIDTH`; tables left as they are."""
    out = []
    for para in body.split("\n\n"):
        if para.startswith("|"):
            out.append(para)
        elif para.startswith("- "):
            items = ("\n" + para).split("\n- ")[1:]
            out.append("\n".join(textwrap.fill(
                "- " + " ".join(item.split()), WIDTH, subsequent_indent="  ",
                break_long_words=False, break_on_hyphens=False) for item in items))
        else:
            out.append(textwrap.fill(" ".join(para.split()), WIDTH, break_long_words=False,
                                     break_on_hyphens=False))
    return "\n\n".join(out)


def record_reader(root: Path = RECORDS) -> Callable[[str], Record]:
    """``records(name)``: the :class:`Record` ``name`` of ``root``, each read and checked
    once (what the renderers take)."""
    cache: dict[str, Record] = {}

    def records(name: str) -> Record:
        if name not in cache:
            cache[name] = Record(name, root)
        return cache[name]
    return records


def render(text: str, root: Path = RECORDS) -> tuple[str, list[str]]:
    """``text`` with every record passage rendered, and the problems found (unknown
    renderers, renderers without a passage, records that fail their manifest)."""
    problems: list[str] = []
    records = record_reader(root)
    seen = []

    def one(m: re.Match) -> str:
        name = m.group(2)
        seen.append(name)
        if "<!-- record:" in m.group(3):
            problems.append(f"README passage '{name}' has no <!-- /record --> before the next "
                            "passage opens: close it")
            return m.group(0)
        if name not in RENDERERS:
            problems.append(f"README passage '{name}' has no renderer in paper/readme.py")
            return m.group(0)
        read: list[str] = []  # the records this passage reads, for a problem to name

        def reading(record: str) -> Record:
            read.append(record)
            return records(record)

        try:
            body = wrap(RENDERERS[name](reading))
            # a figure that is a NaN or an infinity in its record, formatted as it is
            bad = NOT_A_NUMBER.search(body)
            if bad:
                raise ValueError(f"would state {bad[0]!r}")
        except RecordError as err:
            problems.append(str(err))
            return m.group(0)
        # int(nan) and the like, or the check above; TypeError: a JSON output's figure that
        # was not finite is null there (qerror.files.json_text), which a format or a sum
        # meets as None
        except (TypeError, ValueError) as err:
            problems.append(f"README passage '{name}': {err}; a figure it states is not a "
                            "number in the records it reads ("
                            + ", ".join(f"record {r}" for r in dict.fromkeys(read))
                            + "): look into those runs' outputs")
            return m.group(0)
        return f"{m.group(1)}{body}\n{m.group(4)}"

    out = _BLOCK.sub(one, text)
    problems += [f"renderer '{n}' has no passage in the README (<!-- record: {n} -->)"
                 for n in RENDERERS if n not in seen]
    problems += [f"README passage '{n}' appears {seen.count(n)} times: keep one"
                 for n in sorted(set(seen)) if seen.count(n) > 1]
    # every marker must be one the pattern above reads: another spelling (an underscore, a
    # capital) would hold text that is never rendered nor checked
    bare = re.sub(r"`[^`\n]*`", "", text)  # markers quoted as code are prose
    opened = re.findall(r"<!--\s*record:\s*(.*?)\s*-->", bare)
    # ... and written exactly so, on a line of its own: a stray space opens a passage the
    # pattern above never reads
    problems += [f"README marker {m.group(0).strip()!r} is not written as '<!-- record: "
                 f"{m.group(1)} -->' at the end of its line: its passage is never rendered "
                 "nor checked" for m in re.finditer(r"<!--\s*record:\s*(.*?)\s*-->[^\n]*\n?",
                                                    bare)
                 if m.group(0) != f"<!-- record: {m.group(1)} -->\n"]
    closed = len(re.findall(r"<!--\s*/record\s*-->", bare))
    problems += [f"README marker '<!-- record: {n} -->' is not a passage name (lower-case "
                 "letters, digits and hyphens)" for n in opened if not re.fullmatch(
                     r"[a-z0-9-]+", n)]
    if closed != bare.count("<!-- /record -->"):
        problems.append("a README marker closing a passage is not written as "
                        "'<!-- /record -->': the passage before it runs on into the next")
    if len(opened) != closed:
        problems.append(f"the README opens {len(opened)} record passages and closes {closed}")
    out, more = render_settings(out)
    return out, problems + more


def differing(old: str, new: str) -> list[str]:
    """Names of the passages whose text differs between two versions of the README."""
    a = {m.group(2): m.group(3) for m in _BLOCK.finditer(old)}
    b = {m.group(2): m.group(3) for m in _BLOCK.finditer(new)}
    return sorted(n for n in b if a.get(n) != b[n])


#: A record's name: a folder of paper/record, never a path that leads out of it.
_RECORD_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


def commit_in_repo(commit: str, repo: Path = REPO) -> bool:
    """Whether ``commit`` is a commit of the git repository at ``repo``
    (``git cat-file -e COMMIT^{commit}``).

    Raises
    ------
    RecordError
        When git cannot be run there (not installed, or ``repo`` is not a repository), so
        the commit cannot be checked.
    """
    try:
        done = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=repo,
                              capture_output=True, text=True)
        inside = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=repo,
                                capture_output=True, text=True)
    except OSError as err:
        raise RecordError(f"cannot run git to check the run's commit {commit} ({err}); "
                          "records are added from a git checkout of this repository") from err
    if inside.returncode != 0:
        raise RecordError(f"{repo} is not a git repository ({inside.stderr.strip()}), so the "
                          f"run's commit {commit} cannot be checked; add records from a git "
                          "checkout of this repository")
    return done.returncode == 0


_MACHINE_FIELDS = (("commit", lambda m: (m.get("git") or {}).get("commit")),
                   ("platform", lambda m: m.get("platform")),
                   ("cpus", lambda m: (m.get("machine") or {}).get("cpus")),
                   ("CPU kernels", lambda m: (m.get("cpu") or {}).get("cpu_capability")))


def _what_differs(old: dict, new: dict) -> list[str]:
    """How the runs of two manifests differ in what a record.json's words describe."""
    out = []
    for what, get in _MACHINE_FIELDS:
        a, b = get(old), get(new)
        if a != b:
            out.append(f"{what} {a} → {b}" if what != "commit" else
                       f"commit {str(a)[:7]} → {str(b)[:7]}")
    return out


def add(spec: str, files: list[str], root: Path = RECORDS) -> Path:
    """Copy a finished run's manifest and outputs into ``root/NAME`` (``spec`` NAME=RUN).

    NAME is lower-case letters, digits, ``-`` and ``_``; RUN a finished run of a commit of
    this repository that holds every FILE its manifest lists (top-level outputs). A record
    replaced keeps its ``record.json``; when the new run is of another commit or machine, a
    warning on stderr names what differs, so that its words are checked.

    Raises
    ------
    RecordError
        Naming what is wrong with NAME, RUN or a FILE; nothing is written then.
    """
    name, _, run = spec.partition("=")
    run_dir = Path(run)
    if not name or not run or not (run_dir / "manifest.json").is_file():
        raise RecordError(f"--add {spec}: give NAME=RUN with RUN a finished run's folder "
                          "(it holds manifest.json)")
    if not _RECORD_NAME.fullmatch(name):
        raise RecordError(f"--add {spec}: the record's name {name!r} is not lower-case "
                          "letters, digits, '-' and '_' (it names a folder of paper/record, "
                          "never a path), e.g. --add early-exit-seed3=RUN")
    if (run_dir / STAGING_MARK).exists():
        raise RecordError(f"--add {spec}: {run_dir} is a study's staging folder (it holds "
                          f"{STAGING_MARK}): that run has not finished; add the folder it "
                          "publishes")
    manifest = _json_object(run_dir / "manifest.json", f"--add {spec}", f"{run_dir} is not a "
                            "finished run's folder as the study wrote it; add one that is")
    for f in files:
        if f not in manifest.get("outputs", {}):
            raise RecordError(f"--add: {f} is not an output of {run_dir} (its manifest)")
        if Path(f).name != f:
            raise RecordError(f"--add: {f} is in a subfolder of the run; a record holds the "
                              "run's top-level outputs only")
        if not (run_dir / f).is_file():
            raise RecordError(f"--add: {f}, listed in {run_dir}'s manifest, is not in that "
                              "folder (the run was moved or cut short); add a complete run")
    folder = root / name
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    aside = staging.with_name(staging.name + ".old")  # the record replaced, until the new is in
    try:
        for f in ["manifest.json", *files]:
            shutil.copyfile(run_dir / f, staging / f)
        about = folder / "record.json"
        if about.is_file():  # the words stay with the record they describe
            shutil.copyfile(about, staging / "record.json")
        else:
            (staging / "record.json").write_text(json.dumps(
                {"command": " ".join(["python -m studies." + manifest.get("study", "?"),
                                      *manifest.get("argv", [])]),
                 "machine": "(describe the machine and what else ran)"}, indent=2) + "\n")
        try:
            Record(staging.name, root)  # the copies match the manifest, of one clean commit
        except RecordError as err:
            why = str(err).replace(f"record {staging.name}", f"record {name}")
            if about.is_file():  # the words kept from the record this run would replace
                why += (f" (the record.json kept from the record it replaces, {about}, "
                        "describes that run: write the new run's command there, or remove "
                        f"{folder} first to start from the run's own)")
            raise RecordError(why) from None
        commit = manifest["git"]["commit"]
        if not commit_in_repo(commit):
            raise RecordError(f"--add {spec}: the run's commit {commit} is not in this "
                              "repository, so a reader could not check out the code that "
                              "measured it; record a run of a commit of this repository "
                              "(fetch or push it first)")
        differs = []
        if about.is_file() and (folder / "manifest.json").is_file():
            try:
                differs = _what_differs(json.loads((folder / "manifest.json").read_text()),
                                        manifest)
            except (ValueError, AttributeError):  # damaged, as a record a re-add repairs:
                differs = _what_differs({}, manifest)  # the run its words describe is unknown
        # by renames, the old record removed only once the new one is in its place: a
        # Ctrl-C leaves one of them whole
        if folder.exists():
            folder.rename(aside)
        staging.rename(folder)
    finally:
        if aside.exists() and not folder.exists():  # stopped between the renames
            aside.rename(folder)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    if differs:
        words = json.loads((folder / "record.json").read_text())
        print(f"[readme] warning: record {name} keeps its record.json (machine: "
              f"{words.get('machine')!r}), written for the run it replaced; the new run "
              f"differs in {', '.join(differs)}: check its command and machine",
              file=sys.stderr)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python paper/readme.py", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a passage differs from its rendering")
    parser.add_argument("--add", metavar="NAME=RUN", default=None,
                        help="copy RUN's manifest and the FILES into paper/record/NAME")
    parser.add_argument("files", nargs="*", help="outputs to copy with --add")
    args = parser.parse_args(argv)
    try:
        if args.add is not None:
            print(f"[readme] record written: {add(args.add, args.files)}")
            return 0
        if args.files:
            parser.error("FILES go with --add")
        old = README.read_text(encoding="utf-8")
        new, problems = render(old)
    except RecordError as err:
        print(f"[readme] error: {err}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"[readme] {p}", file=sys.stderr)
    changed = differing(old, new)
    settings = differing_settings(old, new)
    if args.check:
        for n in changed:
            print(f"[readme] passage '{n}' differs from its rendering: run python "
                  "paper/readme.py", file=sys.stderr)
        for n in settings:
            print(f"[readme] setting '{n}' differs from the constant it states: run python "
                  "paper/readme.py", file=sys.stderr)
        if new != old and not changed and not settings:
            print("[readme] the README differs from its rendering: run python paper/readme.py",
                  file=sys.stderr)
        return 1 if new != old or problems else 0
    if problems:  # nothing is written from a README or records that are not sound
        return 1
    if new != old:
        atomic_write(README, lambda tmp: tmp.write_text(new, encoding="utf-8"))
    print(f"[readme] {len(changed)} passage(s) and {len(settings)} setting(s) rewritten"
          if changed or settings else "[readme] every passage and setting is current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
