"""Build the paper from the studies' outputs: collect, check, write the generated parts, compile.

``python paper/build.py`` (``make paper``) reads one output folder per study (default
``runs/<study>``; ``--run STUDY=PATH`` points one elsewhere), checks each against its
``manifest.json`` (the study it names, the sha256 of every output) and against what the
paper uses (every ``\\studyfigure``/``\\studytable`` file and every ``\\<study>Name``
result macro the ``.tex`` sources name; for the full paper, against what the prose says of
those figures in words, :data:`DIRECTIONS`), copies it into ``generated/<study>/``, writes
the claims ledger table (``python -m studies.ledger --latex``), what the README's records
say of the early-exit baselines (``readme.tex``, read from ``paper/record`` through
``paper/readme.py``), the settings of the runs that the prose states in words
(``settings.tex``, ``\\setting...`` macros from each run's manifest ``config``) and the
provenance appendix (each study's command, git commit, network and outputs' sha256), all in a
staging folder beside
``paper/generated/`` that then replaces it whole (a failed or interrupted build leaves the
previous one), then compiles ``paper/main.tex``
with latexmk and fails on what the log says went wrong (undefined references, citations or
control sequences, missing files, LaTeX errors).

``--smoke`` (``make paper-smoke``) first runs every study with ``--smoke`` into a temporary
folder and builds from those outputs: the same paper, with tiny-sample numbers.

A missing or unusable study output is named with the command that makes it, and the build
exits non-zero before LaTeX runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Run as a script, this file's own checkout supplies qerror and studies, not the one the
# environment installed in editable mode (another checkout's git_identity would name its
# commit in the provenance).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qerror.files import sha256_file
from studies._common import (
    StudyError,
    clean_stale_partials,
    git_identity,
    is_smoke_run,
    manifest_shape,
    publish_folder,
    sigterm_as_sigint,
    staging_folder,
    user_path,
)
from studies._latex import NOT_A_NUMBER, count, macro_name

PAPER = Path(__file__).resolve().parent
REPO = PAPER.parent
GENERATED = PAPER / "generated"
MAIN = "main.tex"
#: Where a PDF that LaTeX wrote in a build that failed its checks goes (never main.pdf).
FAILED_PDF = "main.failed.pdf"

# The studies the paper reads, in the order they run, and the command that makes each one's
# default output folder (runs/<study>) for the error message of a missing one.
STUDIES = ("rounding", "dataset", "drift", "seeds", "rounding_choice", "early_exit",
           "compression")
MAKE_COMMAND = {
    "rounding": "python -m studies.rounding --force",
    "dataset": "python -m studies.dataset --force",
    "drift": "make run  (python -m studies.drift --force)",
    "seeds": "python -m studies.seeds --force",
    "rounding_choice": "python -m studies.rounding_choice --force",
    "early_exit": "python -m studies.early_exit --force",
    "compression": "python -m studies.compression --force",
}

def make_command(study: str, folder: Path | None) -> str:
    """The command that writes ``study``'s output where the build reads it: the default
    (:data:`MAKE_COMMAND`) for ``runs/<study>`` of this repository, else the study with
    ``--out`` set to ``folder`` (``make run`` writes to the default folder only)."""
    default = REPO / "runs" / study
    if folder is None or Path(folder).resolve() == default.resolve():
        return MAKE_COMMAND[study]
    return f"python -m studies.{study} --out {shlex.quote(str(folder))} --force"


# Extra arguments of each study's --smoke run: the studies that read Fashion-MNIST get
# --data-root when the build is given one.
NEEDS_DATA = {"dataset", "drift", "seeds", "rounding_choice", "early_exit", "compression"}
# Smoke presets that leave out a path the paper reports: the drift study's smoke measures a
# fixed subset, its default sizes the subset by a pilot (whose macros the paper uses).
SMOKE_ARGS = {"drift": ["--images", "auto"]}


class BuildError(Exception):
    """An expected failure: its message says what is missing and which command makes it."""


# --------------------------------------------------------------------------- what the paper uses


_USE = re.compile(r"\\study(?:figure|table)\*?(?:\[[^\]]*\])?\{([A-Za-z_]+)\}\{([^}]+)\}")
_MACRO_DEF = re.compile(r"\\newcommand\{\\([A-Za-z]+)\}")
# A macro's body, one definition a line as studies._common.write_macros writes them.
_MACRO_BODY = re.compile(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}\s*$", re.M)


@dataclass(frozen=True)
class Uses:
    """What the paper's sources take from each study: files and result macros, and the
    settings of its runs the prose states (``\\setting...`` macros, :data:`SETTINGS`)."""

    files: dict[str, set[str]]
    macros: dict[str, set[str]]
    settings: frozenset[str] = frozenset()


def _strip_comments(text: str) -> str:
    return re.sub(r"(?<!\\)%.*", "", text)


def paper_sources(paper: Path = PAPER) -> list[Path]:
    """The hand-written ``.tex`` sources (``paper/*.tex``; ``generated/`` is not one)."""
    return sorted(paper.glob("*.tex"))


def paper_uses(sources: list[Path], studies: tuple[str, ...] = STUDIES) -> Uses:
    """Files (``\\studyfigure{study}{stem}`` → ``stem.pdf``, ``\\studytable{study}{file}``)
    and macros (``\\<study>Name``) the sources use, per study."""
    files: dict[str, set[str]] = {s: set() for s in studies}
    macros: dict[str, set[str]] = {s: set() for s in studies}
    settings: set[str] = set()
    # A study's macros start with its name in camel case (studies._latex.macro_name).
    prefix = {macro_name(s, ""): s for s in studies}
    macro = re.compile(r"\\(" + "|".join(sorted(prefix, key=len, reverse=True))
                       + r")([A-Z][A-Za-z]*)")
    for path in sources:
        text = _strip_comments(path.read_text(encoding="utf-8"))
        for m in _USE.finditer(text):
            study, name = m[1], m[2]
            if study not in files:
                raise BuildError(f"{path.name}: {m[0]} names no study of the paper "
                                 f"({', '.join(studies)})")
            is_figure = m[0].startswith("\\studyfigure")
            files[study].add(f"{name}.pdf" if is_figure else name)
        for m in macro.finditer(text):
            macros[prefix[m[1]]].add(m[1] + m[2])
        for m in _SETTING_USE.finditer(text):
            if m[1] not in SETTINGS:
                known = ", ".join("\\" + n for n in sorted(SETTINGS))
                raise BuildError(f"{path.name}: \\{m[1]} is not a setting build.py writes "
                                 f"({known})")
            settings.add(m[1])
    return Uses(files, macros, frozenset(settings))


# --------------------------------------------------------------------------- the runs' settings


@dataclass(frozen=True)
class Setting:
    """A setting of a study's run that the prose states in words (a level, a power, how many
    images a share counts), read from the ``config`` of the manifest of the run the paper is
    built from, so that the words follow the run that made the numbers around them."""

    study: str
    key: str  # in the manifest's config
    what: str  # what a valid value is, for the error
    valid: Callable[[object], bool]
    show: Callable[[object], str]  # as the prose writes it


def _real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


#: ``\\setting<Name>`` macros (``generated/settings.tex``), each from its run's config.
SETTINGS = {
    # the power with which the drift study's image counts are chosen and stated
    "settingDriftResolvePower": Setting("drift", "resolve_power", "a power in (0, 1)",
                                        lambda v: _real(v) and 0 < v < 1, lambda v: f"{v:g}"),
    # how many most extreme images the drift's tail shares count, and twice that (the
    # images with the largest float RMS they are set against)
    "settingDriftTailTop": Setting("drift", "tail_top", "a count of images above 0",
                                   _positive_count, count),
    "settingDriftTailTopTwice": Setting("drift", "tail_top", "a count of images above 0",
                                        _positive_count, lambda v: count(2 * v)),
    # the level of the paired one-sided test that chooses the early exits' operating points
    # (None: --select estimate, which chooses by the estimate and no test)
    "settingEarlyExitSelectAlpha": Setting(
        "early_exit", "select_alpha", "a level in (0, 0.5) (None: the run chose its operating "
        "points by their estimates, --select estimate, not by the paired test the paper "
        "describes)", lambda v: _real(v) and 0 < v < 0.5, lambda v: f"{v:g}"),
}
_SETTING_USE = re.compile(r"\\(setting[A-Z][A-Za-z]*)")


def settings_tex(manifests: dict[str, dict], runs: dict[str, Path], used: frozenset[str]
                 ) -> str:
    """``generated/settings.tex``: each setting macro the sources use (``used``), written
    from the config of its study's run.

    Raises
    ------
    BuildError
        Naming every setting whose run does not record it (a run made before its config
        named it) or records a value that is not one, with the command that reruns it.
    """
    lines, problems = ["% generated by paper/build.py from the runs' manifests (config); "
                       "do not edit"], []
    for name in sorted(used):
        s = SETTINGS[name]
        config = (manifests.get(s.study) or {}).get("config") or {}
        value = config.get(s.key)
        if s.key not in config or not s.valid(value):
            recorded = (f"records {value!r}, not {s.what}" if s.key in config else
                        "does not record it (a run made before its config named it)")
            problems.append(f"the paper states \\{name}, config.{s.key} of the {s.study} run "
                            f"{runs.get(s.study)}, which {recorded}; rerun it: "
                            f"{make_command(s.study, runs.get(s.study))}")
            continue
        lines.append(f"\\newcommand{{\\{name}}}{{{s.show(value)}}}")
    if problems:
        raise BuildError("\n".join(problems))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the prose's verdicts


@dataclass(frozen=True)
class Direction:
    """A direction or verdict the hand-written prose states beside a study's result macros
    ("falls from ... to ...", "the same computation"): true of some values only, so the build
    checks it against the figures the paper prints, the macros' bodies as LaTeX sets them."""

    study: str
    says: str  # where the prose says what, for the error
    macros: tuple[str, ...]  # the study's, passed to holds in this order
    holds: Callable[..., bool]


#: What ``main.tex`` says of its figures in words. A full run whose figures say otherwise
#: stops the build: rewrite the sentence (and its entry here), or look into the run.
DIRECTIONS = (
    Direction("dataset", "Sections 'Must the dataset be quantized?' and 'Answers' call the "
              "model's own input quantizer and the offline codes 'the same computation'",
              ("datasetEquivDifferingLogits",), lambda differing: differing == 0),
    Direction("early_exit", "Section 'An INT8 early-exit ResNet50' says the largest INT8 test "
              "ECE 'falls' from before calibration to after the NLL temperature",
              ("earlyExitEceBeforeMaxInt", "earlyExitEceAfterMaxIntNll"),
              lambda before, after: after < before),
    Direction("early_exit", "Section 'An INT8 early-exit ResNet50' says the largest INT8 test "
              "ECE falls to its figure after the temperature that minimises the validation ECE "
              "too ('minimising the validation ECE itself, to ...')",
              ("earlyExitEceBeforeMaxInt", "earlyExitEceAfterMaxIntEce"),
              lambda before, after: after < before),
    Direction("early_exit", "Section 'An INT8 early-exit ResNet50' says the isotonic map 'can "
              "bend' the confidence curve that the rules' temperature cannot straighten (its "
              "largest test ECE below the temperature's)",
              ("earlyExitEceAfterMaxIntIsotonic", "earlyExitEceAfterMaxInt"),
              lambda isotonic, temperature: isotonic < temperature),
    Direction("early_exit", "Section 'An INT8 early-exit ResNet50' says joint fine-tuning "
              "'raises the last exit too' (its test accuracy above the frozen variant's)",
              ("earlyExitLastTestFrozen", "earlyExitLastTestJoint"),
              lambda frozen, joint: joint > frozen),
)


def _macro_number(body: str) -> float:
    """A result macro's figure as the paper prints it (a true minus sign, thousands
    separators); ValueError if the body is not one number."""
    return float(body.replace("\\ensuremath{-}", "-").replace("{,}", "").replace(",", ""))


def check_directions(runs: dict[str, Path], manifests: dict[str, dict], uses: Uses,
                     directions: tuple[Direction, ...] = DIRECTIONS) -> list[str]:
    """Each direction of the prose (:data:`DIRECTIONS`) that the figures of its study's run
    (``runs``, checked: ``manifests``) contradict, or leave undefined, as a problem to report.
    A direction is judged where the sources (``uses``) quote one of its macros, the sentence
    that states it: not where its study is not among ``runs``."""
    problems = []
    for d in directions:
        if d.study not in runs or not set(d.macros) & uses.macros.get(d.study, set()):
            continue
        outputs = manifests[d.study].get("outputs") or {}
        text = (runs[d.study] / "macros.tex").read_text(encoding="utf-8") \
            if "macros.tex" in outputs else ""
        defined = {m[1]: m[2] for m in _MACRO_BODY.finditer(text)}
        bodies = [defined.get(name) for name in d.macros]
        try:
            if d.holds(*(_macro_number(b) for b in bodies)):
                continue
        except (TypeError, AttributeError, ValueError):
            pass  # undefined, or not one number: the sentence cannot be judged true
        shown = ", ".join(f"\\{n} = {b if b is not None else 'undefined'}"
                          for n, b in zip(d.macros, bodies))
        problems.append(f"{d.says}, but the {d.study} run {runs[d.study]} gives {shown}; "
                        "rewrite that sentence of paper/main.tex (and its entry in "
                        "paper/build.py's DIRECTIONS) or look into the run (its command: "
                        f"{study_command(manifests[d.study])})")
    return problems


# --------------------------------------------------------------------------- hand-typed numbers

# The rule, applied to the hand-written sources (paper/*.tex):
#
# * Only the document body counts: the preamble (before \begin{document}), comments and the
#   thebibliography environment (years, volumes, pages of references) are not prose; but what
#   the preamble gives the title page to print (PRINTED_PREAMBLE: \title, \author, ...) is.
# * In prose, a number is a run of digits (with inner . or , as in 0.5 or 10,000) that does
#   not follow a letter. It is refused: results come from the studies' macros, and small
#   counts are written in words ("eight-bit"). A digit run that follows a letter is part of a
#   name (ResNet50, INT8, float32, AVX512) and is allowed; "10k" or "3rd" are refused.
# * In mathematics ($...$, \(...\), \[...\], equation/align/gather/multline), integers are
#   formulas (2^b, 1/12, 10 log10) and allowed; a decimal number (0.5, .5, 1{,}000, 0{.}5) is
#   refused, and so is a formula that is a bare integer of two or more digits ($45$). A
#   formula of numbers alone (digits, operators, \approx, \times, spacing: no variable) is a
#   result when it holds a percent sign ($88\,\%$) or is followed by one or by a unit
#   ($\approx 88$\,\%, $-3$ points, $4$ bits, $2 \times 250$ images, $42$\,dB: UNITS);
#   so is a sample size, n = an integer ($n = 500$). A formula with a variable
#   ($-(1-p_0)/2$\,LSB) or with no unit after it ($1/12$, $32\times32$ input) is not.
# * Definitions (\newcommand, \renewcommand, \def, in the preamble too) are checked in their
#   bodies: a macro holding a typed result is a typed result; LaTeX's float parameters
#   (LATEX_PARAMETERS) are set by number and left alone.
# * Arguments of commands that take names or dimensions, not prose (labels, references,
#   citations, file names and the study commands, environment names and column specs, lengths),
#   and dimensions anywhere (0.85\linewidth, 1ex) are not prose.
NON_PROSE_COMMANDS = (
    "label", "ref", "eqref", "pageref", "autoref", "cref", "Cref", "cite", "citep", "citet",
    "nocite", "input", "include", "includegraphics", "studyfigure", "studytable",
    "longstudytable", "url", "href", "hypersetup", "setlength", "addtolength", "setcounter",
    "vspace", "hspace", "begin", "end", "bibitem", "usepackage", "documentclass", "\\",
)
# \newcommand, \renewcommand and \def: the name and the argument count are not prose, the
# body is (a macro that holds a typed result is a typed result), in the preamble too. LaTeX's
# float-placement parameters are set by number and are not results.
LATEX_PARAMETERS = ("topfraction", "bottomfraction", "textfraction", "floatpagefraction",
                    "dbltopfraction", "dblfloatpagefraction", "arraystretch",
                    "baselinestretch")
_DEFINITION = re.compile(r"\\(?:(?:(?:re)?newcommand|providecommand|DeclareRobustCommand)\*?"
                         r"\s*\{?\\([A-Za-z@]+)\}?(?:\s*\[\d\])?"
                         r"|[gex]?def\s*\\([A-Za-z@]+)(?:#\d)*"
                         r"|(?:re)?newenvironment\*?\s*\{([A-Za-z*]+)\}(?:\s*\[\d\])?)")
# Commands set in the preamble whose arguments the title page prints: prose.
PRINTED_PREAMBLE = ("title", "author", "date", "thanks")
MATH_ENVIRONMENTS = ("equation", "equation*", "align", "align*", "gather", "gather*",
                     "multline", "multline*", "displaymath")
# a dimension is the number with its unit right after it (2mm, 0.5em, 1ex): with a space
# between, "1.25 in accuracy" or "3 pt wide" is prose
_LENGTH = re.compile(r"\d*\.?\d+(?:pt|em|ex|cm|mm|in|bp|sp|pc)(?![A-Za-z])"
                     r"|\d*\.?\d+\s*\\[A-Za-z]*(?:width|height|sep|rule|skip|indent)"
                     r"(?![A-Za-z])")
_PROSE_NUMBER = re.compile(r"(?<![A-Za-z0-9])\d+(?:[.,]\d+)*")
_MATH_DECIMAL = re.compile(r"\d*(?:\.|\{,\}|\{\.\})\d+")
# What follows a count or a measurement: a number in front of one is a result.
UNITS = ("points", "point", "pp", "percent", "bits", "bit", "bytes", "byte", "kB", "MB", "GB",
         "KiB", "MiB", "GiB", "dB", "LSB", "images", "image", "layers", "layer", "samples",
         "runs", "seeds", "steps", "epochs", "iterations", "MACs", "s", "ms", "seconds",
         "minutes", "hours", "times")
_SPACING = r"(?:\s|~|\\[,;:! ]|\\quad\b|\{\})*"
_UNIT_AFTER = re.compile(_SPACING + r"(?:\\%|-?(?:" + "|".join(UNITS) + r")(?![A-Za-z]))")
# The signs and relations a formula of numbers alone may hold besides digits.
_NUMERIC_COMMANDS = re.compile(r"\\(?:times|cdot|approx|sim|simeq|le|leq|ge|geq|pm|mp|lesssim"
                               r"|gtrsim|%|[,;:! ]|quad|left|right|mathrm|text)(?![A-Za-z])")
_MATH_NUMBER = re.compile(r"[-+]?\d+(?:(?:[.,]|\{,\}|\{\.\})\d+)*")
_SAMPLE_SIZE = re.compile(r"(?<![A-Za-z\\])[nN](?:_(?:\{(?:[^{}]|\{[^{}]*\})*\}|\w))?\s*=\s*"
                          r"(\d+(?:(?:[.,]|\{,\}|\{\.\})\d+)*)")


# A fraction of one- or two-digit integers, signed or not ($1/12$\,LSB$^2$, $-1/2$\,LSB,
# \frac{1}{3}): the uniform-noise model's constants, which a unit may follow
_CONSTANT_FRACTION = re.compile(
    r"\s*[-+]?\s*(?:\d{1,2}\s*/\s*\d{1,2}|\\frac\{\d{1,2}\}\{\d{1,2}\})\s*")


def _numeric_formula(body: str) -> bool:
    """Whether a formula (without its delimiters) is numbers alone: digits, signs,
    relations, spacing, no variable."""
    rest = _NUMERIC_COMMANDS.sub(" ", body).replace("{", " ").replace("}", " ")
    return bool(re.search(r"\d", rest)) and re.fullmatch(r"[\d\s.,+\-*/=<>()^_~|]*", rest) \
        is not None


@dataclass(frozen=True)
class HandTyped:
    """A number typed into the paper's prose: the line it is on and what it is."""

    line: int
    number: str
    context: str


def _blank(text: str, start: int, end: int) -> str:
    """``text`` with ``[start, end)`` replaced by spaces, its newlines kept (line numbers hold)."""
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def _group_end(text: str, i: int) -> int:
    """The end of the balanced ``{...}`` or ``[...]`` group opening at ``i``."""
    close = {"{": "}", "[": "]"}[text[i]]
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if ch == text[i]:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return len(text)


def _math_spans(text: str) -> list[tuple[int, int]]:
    envs = "|".join(re.escape(e) for e in MATH_ENVIRONMENTS)
    pattern = re.compile(r"\\begin\{(" + envs + r")\}.*?\\end\{\1\}|\$\$.*?\$\$|(?<!\\)\\\[.*?\\\]"
                         r"|(?<!\\)\\\(.*?\\\)|(?<!\\)\$.*?(?<!\\)\$", re.S)
    return [m.span() for m in pattern.finditer(text)]


def hand_typed_numbers(source: str) -> list[HandTyped]:
    """Every number in ``source`` (a LaTeX file) that breaks the rule above."""
    text = re.sub(r"(?<!\\)%[^\n]*", lambda m: " " * len(m[0]), source)
    # each definition: its head blanked, its body kept as prose (or blanked whole for the
    # parameters LaTeX sets by number)
    bodies: list[tuple[int, int]] = []
    for m in reversed(list(_DEFINITION.finditer(text))):
        end = m.end()
        while end < len(text) and text[end] in " \t":
            end += 1
        body_end = _group_end(text, end) if end < len(text) and text[end] in "{[" else end
        while body_end < len(text) and text[body_end] == "{" and end < body_end \
                and text[end] == "[":  # [default]{body}
            body_end = _group_end(text, body_end)
        if (m[1] or m[2]) in LATEX_PARAMETERS:
            text = _blank(text, m.start(), body_end)
        else:
            text = _blank(text, m.start(), m.end())
            bodies.append((m.end(), body_end))
    begin = text.find(r"\begin{document}")
    if begin >= 0:
        kept = [(s, e, text[s:e]) for s, e in bodies if s < begin]
        printed = r"\\(?:" + "|".join(PRINTED_PREAMBLE) + r")(?![A-Za-z])\*?\s*"
        for m in re.finditer(printed, text[:begin]):
            end = m.end()
            while end < begin and text[end] in "{[":
                end = _group_end(text, end)
            kept.append((m.end(), end, text[m.end():end]))
        text = _blank(text, 0, begin + len(r"\begin{document}"))
        # definitions and what the title page prints are checked as the body is
        for s, e, body in kept:
            text = text[:s] + body + text[e:]
    for m in re.finditer(r"\\begin\{thebibliography\}.*?\\end\{thebibliography\}", text, re.S):
        text = _blank(text, *m.span())
    found: list[tuple[int, str]] = []
    for start, end in _math_spans(text):
        found += [(start + m.start(), m[0]) for m in _MATH_DECIMAL.finditer(text[start:end])]
        # a formula that is nothing but an integer of two or more digits ($45$, $-45$) or a
        # percentage ($88\%$) is a count typed in math ($0$ and $1$ are the theory's
        # constants)
        bare = re.fullmatch(r"(\$\$?|\\[(\[])\s*([-+]?\s*\d{2,}|[-+]?\s*\d+\s*\\%)\s*"
                            r"(\$\$?|\\[)\]])", text[start:end])
        if bare:
            found.append((start + bare.start(2), bare[2]))
        body = re.sub(r"^(\$\$?|\\[(\[])|(\$\$?|\\[)\]])$", "", text[start:end])
        offset = start + (len(text[start:end]) - len(text[start:end].lstrip("$\\[(")))
        if not bare and _numeric_formula(body) and not _CONSTANT_FRACTION.fullmatch(body) \
                and ("\\%" in body or _UNIT_AFTER.match(text, end)):
            found += [(offset + m.start(), m[0]) for m in _MATH_NUMBER.finditer(body)]
        found += [(offset + m.start(1), m[1]) for m in _SAMPLE_SIZE.finditer(body)]
        text = _blank(text, start, end)
    names = "|".join(re.escape(c) for c in sorted(NON_PROSE_COMMANDS, key=len, reverse=True))
    for m in reversed(list(re.finditer(r"\\(?:" + names + r")(?![A-Za-z])\*?", text))):
        end = m.end()
        groups = 0
        while end < len(text) and text[end] in "{[":
            if m[0] == "\\href" and groups == 1:
                break  # \href{url}{text}: the text is prose
            end = _group_end(text, end)
            groups += 1
        text = _blank(text, m.start(), end)
    for m in reversed(list(_LENGTH.finditer(text))):
        text = _blank(text, *m.span())
    text = re.sub(r"#\d", "  ", text)
    found += [(m.start(), m[0]) for m in _PROSE_NUMBER.finditer(text)]
    out, taken = [], -1
    for pos, number in sorted(found, key=lambda f: (f[0], -len(f[1]))):
        if pos < taken:  # a number two rules found (a decimal in a formula with a unit)
            continue
        taken = pos + len(number)
        line = source.count("\n", 0, pos) + 1
        out.append(HandTyped(line, number, source.splitlines()[line - 1].strip()))
    return out


def check_sources(sources: list[Path]) -> None:
    """BuildError listing every hand-typed number in the sources."""
    bad = [f"{p.name}:{h.line}: {h.number!r} in: {h.context}" for p in sources
           for h in hand_typed_numbers(p.read_text(encoding="utf-8"))]
    if bad:
        raise BuildError("numbers typed by hand in the paper (use the studies' macros, or "
                         "words for small counts):\n  " + "\n  ".join(bad))


# --------------------------------------------------------------------------- study folders


def study_command(manifest: dict) -> str:
    """The command line that made a run, from its manifest's study and argv."""
    argv = manifest.get("argv") or []
    return shlex.join(["python", "-m", f"studies.{manifest['study']}", *map(str, argv)])


def check_run(study: str, folder: Path, uses: Uses) -> dict:
    """The manifest of ``folder`` once it is a complete, unaltered run of ``study`` that holds
    every file and macro the paper uses.

    Raises
    ------
    BuildError
        Naming the folder, what is wrong, and the command that makes the output.
    """
    make = f"make it with: {make_command(study, folder)}"
    if folder.is_dir() is False:
        raise BuildError(f"no output of the {study} study at {folder}; {make} "
                         f"(or pass --run {study}=PATH, or build the smoke paper: "
                         "make paper-smoke)")
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise BuildError(f"{folder} has no readable manifest.json ({err}), so it is not a "
                         f"finished run of the {study} study; {make}") from err
    shape = manifest_shape(manifest)
    if shape is not None:
        raise BuildError(f"{folder}/manifest.json is not a study's manifest (it holds {shape}), "
                         f"so it is not a finished run of the {study} study; {make}")
    if manifest.get("study") != study or not isinstance(manifest.get("outputs"), dict):
        raise BuildError(f"{folder}/manifest.json is not a run of the {study} study "
                         f"(it names {manifest.get('study')!r}); {make}")
    redo = f"rerun it: {study_command(manifest)} --force" if "--force" not in (
        manifest.get("argv") or []) else f"rerun it: {study_command(manifest)}"
    for name, digest in sorted(manifest["outputs"].items()):
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            # the build copies each output to generated/<study>/<name>: such a name would
            # write outside it
            raise BuildError(f"{folder}/manifest.json lists {name!r} as an output, which is "
                             "not a file inside the run's folder, so it is not a study's "
                             f"manifest as written; {make}")
        if not path.is_file():
            raise BuildError(f"{folder}: {name}, listed in its manifest, is missing; {redo}")
        if sha256_file(path) != digest:
            raise BuildError(f"{folder}: {name} is not the file its manifest lists (sha256 "
                             f"differs: changed after the run); {redo}")
    missing = sorted(uses.files.get(study, set()) - set(manifest["outputs"]))
    if missing:
        raise BuildError(f"{folder}: the paper uses {', '.join(missing)}, which this run of the "
                         f"{study} study did not write (its command: {study_command(manifest)}); "
                         f"{make}")
    wanted = uses.macros.get(study, set())
    if wanted:
        text = (folder / "macros.tex").read_text(encoding="utf-8") \
            if "macros.tex" in manifest["outputs"] else ""
        defined = set(_MACRO_DEF.findall(text))
        absent = sorted(wanted - defined)
        if absent:
            raise BuildError(f"{folder}: the paper quotes " + ", ".join("\\" + a for a in absent)
                             + f", which this run's macros.tex does not define (its command: "
                             f"{study_command(manifest)}); {make}")
        # LaTeX prints "nan" as it prints a figure: a result the run could not compute
        # (an empty sample, a division by zero) is stopped here
        bad = sorted((m[1], m[2]) for m in _MACRO_BODY.finditer(text)
                     if m[1] in wanted and NOT_A_NUMBER.search(m[2]))
        if bad:
            raise BuildError(f"{folder}: the paper quotes " + ", ".join(
                f"\\{name} = {body!r}" for name, body in bad) + ", not a number (the run met "
                f"a NaN or an infinity there); look into its outputs and rerun it (its "
                f"command: {study_command(manifest)})")
    return manifest


def check_runs(runs: dict[str, Path], uses: Uses, *, smoke: bool = False) -> dict[str, dict]:
    """Check every study's folder (:func:`check_run`) and return each one's manifest.

    All problems are reported at once. Unless ``smoke`` (the smoke paper), a ``--smoke`` run
    is refused: its test-sized figures are not the paper's; and so is a set of runs whose
    figures contradict what the prose says of them in words (:data:`DIRECTIONS`), which the
    smoke paper's figures, no results, may do.

    Raises
    ------
    BuildError
        Naming every folder that is not usable, what is wrong and the command that makes it,
        or every sentence of the prose that the runs' figures contradict.
    """
    manifests, problems = {}, []
    for study, folder in runs.items():
        try:
            manifests[study] = check_run(study, folder, uses)
            m = manifests[study]
            if not smoke and is_smoke_run(m):
                problems.append(f"{folder}: a --smoke run of the {study} study; the paper "
                                f"takes full runs ({make_command(study, folder)}), the smoke "
                                "paper is "
                                "make paper-smoke")
        except BuildError as err:
            problems.append(str(err))
    if problems:
        raise BuildError("\n".join(problems))
    check_one_baseline(manifests, runs)
    contradicted = [] if smoke else check_directions(runs, manifests, uses)
    if contradicted:
        raise BuildError("the paper's prose says in words what the runs' figures do not:\n  "
                         + "\n  ".join(contradicted))
    return manifests


def checkpoints(manifest: dict) -> list[dict]:
    """The trained networks a run loaded from a checkpoint file: the model identities its
    manifest records (``model``, or each of ``models``) that carry the file's sha256."""
    found = [manifest.get("model")] + list((manifest.get("models") or {}).values())
    return [m for m in found if isinstance(m, dict) and m.get("sha256")]


def check_one_baseline(manifests: dict[str, dict], runs: dict[str, Path]) -> None:
    """BuildError unless the runs that loaded a trained checkpoint of one network (by its
    name: architecture and stem) loaded the same file (by sha256): the paper's studies
    measure one baseline network, and numbers of two trainings of it side by side would read
    as one's. Different networks (rounding_choice's ResNet18 beside the ResNet50) are not a
    mix.

    Raises
    ------
    BuildError
        Naming each run, its folder and its checkpoint.
    """
    used = {study: checkpoints(m) for study, m in manifests.items()}
    # per network (its name: architecture and stem): a run that measures two architectures
    # (rounding_choice --models resnet18 resnet50 small) is no mix, two files of one is
    by_network: dict[str, set[str]] = {}
    for found in used.values():
        for c in found:
            by_network.setdefault(str(c.get("model", "unnamed network")), set()).add(c["sha256"])
    mixed = {name: digests for name, digests in by_network.items() if len(digests) > 1}
    if not mixed:
        return
    lines = [f"{study} ({runs[study]}): "
             + "; ".join(f"{c.get('model', 'unnamed network')} sha256 {c['sha256'][:12]} "
                         f"({c.get('checkpoint', 'no path')})" for c in found)
             for study, found in used.items() if found]
    raise BuildError("the runs used different checkpoints of one network ("
                     + ", ".join(f"{name}: {len(d)} files" for name, d in mixed.items())
                     + "), so the paper would report them as one:\n  " + "\n  ".join(lines)
                     + "\nrerun the studies that differ on one checkpoint (their --checkpoint, "
                     "or the cached baseline), or point --run STUDY=PATH at runs of one")


def _copy_runs(runs: dict[str, Path], manifests: dict[str, dict], generated: Path) -> None:
    """Copy each checked run's outputs and manifest into ``generated/<study>/``."""
    for study, folder in runs.items():
        dest = generated / study
        dest.mkdir()
        for name in manifests[study]["outputs"]:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, target)
        shutil.copyfile(folder / "manifest.json", dest / "manifest.json")


def runs_inside(runs: dict[str, Path], generated: Path) -> list[str]:
    """The study folders of ``runs`` that lie in ``generated`` (or are it), each as a
    problem to report: the build replaces that folder, so it would delete its own input."""
    where = generated.resolve()
    return [f"the {study} run {folder} is inside {generated}, the folder this build "
            f"replaces with the runs it copies: build from the runs' own folders (--runs "
            f"DIR, --run {study}=PATH; default runs/{study}), not from the build's copies"
            for study, folder in runs.items()
            if folder.resolve() == where or folder.resolve().is_relative_to(where)]


def write_generated(runs: dict[str, Path], uses: Uses, generated: Path | None = None, *,
                    smoke: bool = False) -> dict[str, dict]:
    """Write the whole generated tree (each study's run, the claims ledger, the provenance
    appendix) into a staging folder beside ``generated`` (default :data:`GENERATED`), then
    put it in place by renames (:func:`studies._common.publish_folder`).

    A failure or an interruption before the swap leaves the previous ``generated`` as it
    was (the staging folder is removed, or, if the process is killed, left marked for the
    next build to remove): never a partial tree where the paper reads one. Returns each
    study's manifest.

    Raises
    ------
    BuildError
        A run is unusable (:func:`check_runs`) or lies inside ``generated``, the ledger
        fails, or the staging folder cannot be made.
    """
    generated = GENERATED if generated is None else generated
    inside = runs_inside(runs, generated)
    if inside:
        raise BuildError("\n".join(inside))
    manifests = check_runs(runs, uses, smoke=smoke)
    settings = settings_tex(manifests, runs, uses.settings)
    try:
        if generated.parent.is_dir():
            clean_stale_partials(generated)
        stage = staging_folder(generated, "the paper's generated parts")
    except (OSError, StudyError) as err:
        raise BuildError(f"cannot stage the generated parts beside {generated}: {err}") from err
    try:
        _copy_runs(runs, manifests, stage)
        ledger_git = git_identity()  # the checkout the ledger is generated from
        ledger = write_ledger(stage)
        readme, records = readme_tex()
        (stage / "readme.tex").write_text(readme, encoding="utf-8")
        (stage / "build.tex").write_text(build_tex(manifests), encoding="utf-8")
        (stage / "settings.tex").write_text(settings, encoding="utf-8")
        (stage / "provenance.tex").write_text(
            provenance_tex(manifests, ledger, ledger_git["commit"], ledger_git["dirty"],
                           records), encoding="utf-8")
        publish_folder(stage, generated)
    except (OSError, StudyError) as err:
        raise BuildError(f"the generated parts could not be written to {generated}: {err}"
                         ) from err
    finally:
        if stage.exists():  # not published
            shutil.rmtree(stage, ignore_errors=True)
    return manifests


# --------------------------------------------------------------------------- generated LaTeX


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """``text`` as LaTeX prose (special characters escaped)."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def _tt(text: str) -> str:
    # Breakable typewriter text: long paths and commands may wrap after / and _ and spaces;
    # "-{}" keeps "--smoke" two hyphens (T1 fonts make an en dash of "--"); quotes stay
    # straight, as the shell needs them (T1 typewriter curls ' and `; upquote straightens
    # verbatim only, not \texttt).
    out = tex_escape(text).replace("-", "-{}").replace("/", r"/\allowbreak{}") \
        .replace(r"\_", r"\_\allowbreak{}").replace("'", r"\textquotesingle{}") \
        .replace("`", r"\textasciigrave{}")
    return r"\texttt{" + out + "}"


def provenance_tex(manifests: dict[str, dict], ledger_command: str, commit: str | None,
                   dirty: bool | None = False,
                   records: tuple[tuple[str, str], ...] = ()) -> str:
    """The appendix that traces every generated part of the paper to its command and run;
    ``commit`` and ``dirty``: the checkout the claims ledger was generated from;
    ``records``: the README's records (name, commit) the ``\\readme...`` macros read."""
    lines = ["% generated by paper/build.py; do not edit",
             r"\section{Provenance of the generated results}",
             r"\label{app:provenance}",
             "Every number, table and figure of the results comes from one of the runs below, "
             "copied unchanged into \\texttt{paper/generated/} by \\texttt{paper/build.py}, "
             "which checks each file against the sha256 its run recorded.",
             "",
             r"\paragraph{Claims ledger.} " + _tt(ledger_command) + " at commit "
             + _tt(commit or "unknown")
             + (" with uncommitted changes" if dirty else " (uncommitted changes unknown)"
                if dirty is None else "") + ".",
             ""]
    if records:
        lines += [r"\paragraph{README records.} What the text says of the repository "
                  "README's early-exit baselines is read by \\texttt{paper/build.py}, "
                  "through \\texttt{paper/readme.py}, from its records: "
                  + ", ".join(_tt(f"paper/record/{name}") + " (commit " + _tt(c) + ")"
                              for name, c in records) + ".", ""]
    for study, m in manifests.items():
        git = m.get("git") or {}
        state = ""
        if git.get("dirty"):
            state = " (with uncommitted changes)"
        if git.get("at_finish"):  # the checkout moved while the study ran
            end = git["at_finish"]
            state += (" to " + _tt(end.get("commit") or "unknown")
                      + (" with uncommitted changes" if end.get("dirty") else "")
                      + " (the checkout changed while it ran)")
        lines += [
            rf"\subsection*{{Study \texttt{{{tex_escape(study)}}}}}",
            r"{\raggedright",
            r"\begin{description}[style=unboxed,leftmargin=0pt]",
            r"\item[Command] " + _tt(study_command(m)),
            r"\item[Commit] " + _tt(git.get("commit") or "unknown") + state,
            r"\item[Seed] " + _tt(str((m.get("config") or {}).get("seed", "unrecorded"))),
            *([r"\item[Model] " + model] if (model := _model_words(m)) else []),
            r"\end{description}\par}",
            r"{\scriptsize",
            r"\begin{longtable}{@{}l l@{}}",
            r"\toprule Output & sha256 \\ \midrule \endhead",
        ]
        for name, digest in sorted(m["outputs"].items()):
            # The 64 hex digits in two halves: one line of them beside a long name would
            # run past the margin.
            half = len(digest) // 2
            lines.append(_tt(name) + r" & \texttt{" + tex_escape(digest[:half]) + r"} \\")
            lines.append(r" & \texttt{" + tex_escape(digest[half:]) + r"} \\")
        timing = m.get("timing_outputs") or []
        lines += [r"\bottomrule", r"\end{longtable}}"]
        if timing:
            # Ragged right: a list of unbreakable file names cannot be justified.
            lines.append(r"{\raggedright Outputs holding measured times (differ from run to "
                         "run): " + ", ".join(_tt(t) for t in timing) + r".\par}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _model_words(manifest: dict) -> str:
    """The networks a run measured, as the provenance names them: each checkpoint's sha256
    and file, or the name of a network with no checkpoint file (a smoke run's untrained
    one); empty for a run of no network."""
    loaded = checkpoints(manifest)
    if loaded:
        return "; ".join(
            (tex_escape(str(c["model"])) + ", " if c.get("model") else "") + "checkpoint "
            + r"\texttt{" + c["sha256"] + "}"
            + (" (" + _tt(str(c["checkpoint"])) + ")" if c.get("checkpoint") else "")
            for c in loaded)
    model = manifest.get("model")
    if isinstance(model, dict) and (name := model.get("model") or model.get("arch")):
        return tex_escape(str(name)) + " (no checkpoint file)"
    return ""


def build_tex(manifests: dict[str, dict]) -> str:
    """What the paper is built from, for ``main.tex``: ``\\smokebuildtrue`` when a run is a
    ``--smoke`` run (the smoke paper), so that every page says its numbers are not results."""
    smoke = sorted(s for s, m in manifests.items() if is_smoke_run(m))
    return ("% generated by paper/build.py; do not edit\n"
            + (f"% --smoke runs: {', '.join(smoke)}\n\\smokebuildtrue\n" if smoke else ""))


def _readme():
    """``paper/readme.py``, which renders the README's measured passages from the records in
    ``paper/record/`` (a script beside this one, not a package): loaded by its path, once."""
    name = "paper_readme"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PAPER / "readme.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def early_exit_records_sentence(verdict) -> str:
    """What the README's early-exit records (``paper/readme.py``'s
    ``EarlyExitVerdict``) say of the INT8 early exit against FP32 full, as a clause."""
    m = f"{100 * verdict.margin:g}"
    fails = verdict.baselines - verdict.equivalent
    first = (f"the INT8 early exit is non-inferior to FP32 full at the {m}-point margin on "
             + ("every one" if verdict.non_inferior == verdict.baselines else
                f"{count(verdict.non_inferior)} of them"))
    if fails == 0:
        return first + ", and the equivalence test passes on every one"
    if verdict.fails_upper_only:
        return (first + f", and where the equivalence test fails ({count(fails)} of them) it "
                "fails on its upper side: the early exit may be more accurate than FP32 full "
                "by more than the margin")
    return first + f", and the equivalence test fails on {count(fails)} of them"


def readme_tex(root: Path | None = None) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The macros of what the README's records say (``\\readme...``), and the records they
    come from (name, commit), read from ``root`` (default ``paper/record``).

    Raises
    ------
    BuildError
        A record is missing or does not match its manifest.
    """
    readme = _readme()
    try:
        verdict = readme.early_exit_verdict(readme.record_reader(
            readme.RECORDS if root is None else root))
    except readme.RecordError as err:
        raise BuildError(f"the README's records: {err} (python paper/readme.py --check "
                         "names every problem)") from err
    text = "\n".join([
        "% generated by paper/build.py from paper/record (paper/readme.py); do not edit",
        f"\\newcommand{{\\readmeEarlyExitBaselines}}{{{count(verdict.baselines)}}}",
        f"\\newcommand{{\\readmeEarlyExitVerdict}}{{{early_exit_records_sentence(verdict)}}}",
    ]) + "\n"
    return text, verdict.records


def write_ledger(generated: Path, python: str = sys.executable) -> str:
    """Write the claims table with the ledger's own command; returns that command."""
    out = generated / "claims.tex"
    argv = [python, "-m", "studies.ledger", "--latex", "--out", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"python -m studies.ledger --latex failed: {done.stderr.strip()}")
    return "python -m studies.ledger --latex --out paper/generated/claims.tex"


# --------------------------------------------------------------------------- the LaTeX log


@dataclass(frozen=True)
class LogReport:
    """What a LaTeX log says went wrong (``problems``) and what is worth a look (``notes``)."""

    problems: list[str]
    notes: list[str]


_LOG_PROBLEMS = (
    (re.compile(r"^! Undefined control sequence\.(?:\n.*?(\\[A-Za-z@]+)\s*$)?", re.M),
     "undefined control sequence"),
    (re.compile(r"^! LaTeX Error: File `([^']+)' not found", re.M), "missing file"),
    (re.compile(r"LaTeX Warning: File `([^']+)' not found", re.M), "missing file"),
    (re.compile(r"^! Package pdftex\.def Error: File `([^']+)' not found", re.M),
     "missing figure"),
    (re.compile(r"LaTeX Warning: Reference `([^']+)' on page \S+ undefined", re.M),
     "undefined reference"),
    (re.compile(r"LaTeX Warning: Citation `([^']+)' on page \S+ undefined", re.M),
     "undefined citation"),
    (re.compile(r"LaTeX Warning: Hyper reference `([^']+)' on page \S+ undefined", re.M),
     "undefined reference"),
    (re.compile(r"^(?:LaTeX|Package \w+) Warning: There were undefined (references|citations)",
                re.M), "undefined"),
    (re.compile(r"^! (?!Undefined control sequence)(.+)$", re.M), "LaTeX error"),
)
_OVERFULL = re.compile(r"^Overfull \\[hv]box \((\d+(?:\.\d+)?)pt too (?:wide|high)\) (.*)$", re.M)
OVERFULL_NOTE_PT = 5.0  # an overfull box wider than this is reported (not a failure)


def check_log(text: str) -> LogReport:
    """Problems (a failed build) and notes (overfull boxes above :data:`OVERFULL_NOTE_PT`) in
    a LaTeX log written with ``max_print_line`` large enough not to wrap lines."""
    problems: list[str] = []
    for pattern, what in _LOG_PROBLEMS:
        for m in pattern.finditer(text):
            detail = m[1] if m.lastindex and m[1] else ""
            item = f"{what}: {detail}" if detail else what
            if item not in problems:
                problems.append(item)
    notes = [f"overfull box, {m[1]}pt too wide: {m[2].strip()}"
             for m in _OVERFULL.finditer(text) if float(m[1]) > OVERFULL_NOTE_PT]
    return LogReport(problems, notes)


def compile_pdf(paper: Path = PAPER) -> LogReport:
    """Run latexmk on ``main.tex`` and check its log.

    ``main.pdf`` is there afterwards only when this build passed: the previous one is removed
    first (it is of the generated parts just replaced), and a PDF that LaTeX wrote in a
    failed or interrupted build is moved to ``main.failed.pdf`` for a look, never left where
    the paper is read.

    Raises
    ------
    BuildError
        latexmk is not installed, LaTeX failed, or the log names a problem.
    """
    pdf, failed = paper / "main.pdf", paper / FAILED_PDF
    failed.unlink(missing_ok=True)
    pdf.unlink(missing_ok=True)  # before any failure: it is of the generated parts replaced
    latexmk = shutil.which("latexmk")
    if latexmk is None:
        raise BuildError("latexmk is not installed; on Debian/Ubuntu: apt-get install -y "
                         "--no-install-recommends latexmk texlive-latex-recommended "
                         "texlive-latex-extra texlive-fonts-recommended texlive-science lmodern")
    env = dict(os.environ, max_print_line="100000", error_line="254", half_error_line="238")
    try:
        done = subprocess.run([latexmk, "-pdf", "-g", "-interaction=nonstopmode",
                               "-halt-on-error", MAIN], cwd=paper, env=env, capture_output=True,
                              text=True)
        log = paper / "main.log"
        report = check_log(log.read_text(encoding="utf-8", errors="replace")) if log.exists() \
            else LogReport(["no main.log was written"], [])
        if done.returncode != 0 or report.problems:
            tail = "\n".join(done.stdout.splitlines()[-15:])
            kept = (f"; the PDF it wrote is {failed}, not main.pdf" if pdf.exists() else "")
            raise BuildError("LaTeX failed:\n  " + "\n  ".join(
                report.problems or [f"latexmk exited with {done.returncode}"])
                + f"\n(see {log}{kept}; latexmk's last lines:)\n{tail}")
    except BaseException:
        if pdf.exists():
            pdf.rename(failed)
        raise
    return report


# --------------------------------------------------------------------------- smoke runs


def run_smoke(out: Path, data_root: Path | None, python: str = sys.executable) -> dict[str, Path]:
    """Run every study with ``--smoke`` into ``out/<study>``; returns the folders."""
    runs = {}
    for study in STUDIES:
        argv = [python, "-m", f"studies.{study}", "--smoke", "--out", str(out / study),
                *SMOKE_ARGS.get(study, [])]
        if study in NEEDS_DATA and data_root is not None:
            argv += ["--data-root", str(data_root)]
        print(f"[paper] {shlex.join(argv[1:])}", flush=True)
        done = subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        if done.returncode != 0:
            raise BuildError(f"the smoke run of the {study} study failed "
                             f"({shlex.join(argv[1:])}):\n{done.stderr.strip()[-2000:]}")
        runs[study] = out / study
    return runs


# --------------------------------------------------------------------------- command line


def _run_arg(text: str) -> tuple[str, Path]:
    study, sep, path = text.partition("=")
    if not sep or study not in STUDIES or not path:
        raise argparse.ArgumentTypeError(
            f"expected STUDY=PATH with STUDY one of {', '.join(STUDIES)}, got {text!r}")
    return study, Path(path).expanduser()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python paper/build.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=user_path, default=REPO / "runs",
                        help="folder holding one output folder per study (default: runs/)")
    parser.add_argument("--run", type=_run_arg, action="append", default=[],
                        metavar="STUDY=PATH", help="one study's output folder, elsewhere")
    parser.add_argument("--smoke", action="store_true",
                        help="run every study with --smoke into a temporary folder and build "
                             "from those outputs")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="Fashion-MNIST folder for the smoke runs of "
                             + " and ".join(sorted(NEEDS_DATA)))
    parser.add_argument("--no-compile", action="store_true",
                        help="collect and write the generated parts only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # SIGTERM (a timeout, a batch system) cleans up as Ctrl-C does: without it the
        # build ends at once, leaving its temporary folder and a smoke study running, or
        # LaTeX's main.pdf cut short where the paper is read
        with sigterm_as_sigint():
            sources = paper_sources()
            check_sources(sources)
            uses = paper_uses(sources)
            with tempfile.TemporaryDirectory(prefix="qerror-paper-smoke-") as tmp:
                if args.smoke:
                    runs = run_smoke(Path(tmp), args.data_root)
                else:
                    runs = {s: args.runs / s for s in STUDIES}
                runs.update(dict(args.run))
                write_generated(runs, uses, GENERATED, smoke=args.smoke)
            if args.no_compile:
                # an earlier build's PDF is of the parts just replaced: left, it would read as
                # this build's (compile_pdf removes it first too)
                stale = GENERATED.parent / "main.pdf"
                removed = stale.is_file()
                stale.unlink(missing_ok=True)
                print(f"[paper] generated parts written to {GENERATED}" + (
                    f"; {stale}, of the parts they replaced, was removed (compile: run the "
                    "build without --no-compile)" if removed else ""))
                return 0
            report = compile_pdf()
    except BuildError as err:
        print(f"[paper] error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"[paper] interrupted: no {PAPER / 'main.pdf'} was written; run the build again",
              file=sys.stderr)
        return 130
    for note in report.notes:
        print(f"[paper] note: {note}")
    print(f"[paper] written to {PAPER / 'main.pdf'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
