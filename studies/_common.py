"""Shared plumbing of the studies: run folders, manifests, atomic writes, figures, LaTeX,
and the family-wise adjustment of a table's tests (:func:`holm_columns`).

A study writes everything into a :class:`RunDir`. Files go to a hidden staging folder
next to the destination; :meth:`RunDir.finish` writes ``manifest.json`` (argv, config,
seed, git commit, package versions, the CPU's FBGEMM kernel probe, data and model
identity, sha256 of every output)
and only then moves the folder into place. An interrupted run leaves a ``.partial``
folder and never a folder that looks complete.

Output folder policy (:func:`check_out`): a study writes into ``--out`` only when it does
not exist, is an empty folder, or holds a previous run of the same study (its
``manifest.json`` names the study and lists every file in it); the last is replaced only
with ``--force``. Anything else (a file, a folder of the user's, ``.``, ``~``, a run of
another study, a run whose files were edited since it wrote them) is refused before any
work starts, ``--force`` or not. Stale staging folders of killed runs next to the
destination are removed when their process is gone.

Command-line numbers are checked by the argparse converters here (:func:`positive_int`,
:func:`int_at_least`, :func:`int_in`, :func:`finite_float`, :func:`positive_float`), so a
bad value is refused by argparse with the option's name. :func:`study_main` turns the
expected failures (:class:`StudyError`, missing data, refused checkpoints, OS errors,
Ctrl-C) into one message and a non-zero exit; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from qerror import MAX_SEED
from qerror.cpu import flush_denormal
from qerror.data import CALIB_IMAGES, VAL_IMAGES, DataError, DataNotFoundError, split_images
from qerror.files import (
    PID_DIGITS,
    json_text,
    name_bytes,
    name_room,
    package_versions,
    process_alive,
    sha256_file,
    sync_folder,
    sync_tree,
)
from qerror.interrupts import interrupts, sigint_counted
from qerror.nn.int8 import Engine, kernel_probe
from qerror.nn.models import CheckpointError, forward_layout
from qerror.nn.training import DivergedError, TrainError
from qerror.quantizer import fused_path_enabled
from qerror.stats import holm
from studies._latex import macro_name, readable

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
#: A file that marks a staging folder (``.NAME.partial-PID``) or a replaced run's copy
#: (``.NAME.old-PID``) as one a study made: only folders that hold it are ever removed as
#: left behind (a user's folder of the same name is not a run's).
STAGING_MARK = ".qerror-staging"
EXIT_REFUSED = 2  # bad input or destination, as argparse's own errors
EXIT_OS_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class PublishedInterrupt(KeyboardInterrupt):
    """Ctrl-C after a run was moved to ``--out``: the run is complete; the message says
    what was left undone."""


class StudyError(Exception):
    """An expected failure whose message tells the user what is wrong and what to do.

    :func:`study_main` prints it as one line and exits with :data:`EXIT_REFUSED`.
    """


# --------------------------------------------------------------------------- arguments


def int_at_least(minimum: int, word: str | None = None) -> Callable[[str], int | str]:
    """An argparse ``type=`` for integers of at least ``minimum`` (or the one ``word``, e.g.
    ``auto``, returned as it is).

    The error it raises is shown by argparse with the option's name (``error: argument
    --images: ...``) and exit status 2.
    """
    also = f" or {word!r}" if word else ""

    def convert(text: str) -> int | str:
        if word is not None and text == word:
            return word
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer{also}, got {text!r}") \
                from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{also}, got {value}")
        return value

    convert.__name__ = f"integer >= {minimum}{also}"
    return convert


def int_in(low: int, high: int, why: str | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` for integers from ``low`` to ``high`` inclusive; ``why`` (the
    reason for the range) is added to the message of a value outside it."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}"
                                             + (f" ({why})" if why else ""))
        return value

    convert.__name__ = f"integer in [{low}, {high}]"
    return convert


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


SPLIT_WORDS = {"train": "training", "val": "validation", "calib": "calibration", "test": "test"}


def held_out(info) -> dict[str, int]:
    """The validation and calibration split sizes a checkpoint's network was trained beside,
    as keywords of :func:`qerror.data.fashion_mnist_splits`.

    ``studies.train`` holds out ``val_split`` and ``calib_split`` images of the training
    file (split seed 0, as every study) and records them in its recipe; a study that holds
    out the same never validates or calibrates on images the network trained on. The
    library's defaults for a checkpoint whose recipe records none.
    """
    config = info.config if isinstance(info.config, Mapping) else {}
    recipe = config.get("recipe")
    recipe = recipe if isinstance(recipe, Mapping) else {}  # not a training recipe
    sizes = {}
    for key, field, default in (("val", "val_split", VAL_IMAGES),
                                ("calib", "calib_split", CALIB_IMAGES)):
        value = recipe.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StudyError(f"checkpoint {getattr(info, 'path', '')}: its recipe's {field} is "
                             f"{value!r}, not a number of images; the images it was trained "
                             "beside are unknown. Retrain it with python -m studies.train")
        sizes[key] = value
    return sizes


def check_trained_on(info, data_root, *, download: bool = False,
                     use: str | None = "--checkpoint") -> None:
    """StudyError unless ``data_root`` holds the data the checkpoint's network was trained,
    validated and tested on, as ``studies.train`` recorded them (each split's sha256).

    ``use``: the study's option that takes a checkpoint file, which the refusal tells the
    user to pass a baseline trained on their folder with; None for a study that reads the
    cache's baseline only, where the refusal says how to retrain that one.

    A copy of other images in Fashion-MNIST's format (another data set, an altered one)
    would otherwise be measured against a network that never saw its kind, and its
    held-out splits could hold images the network trained on. A checkpoint that records no
    data is not checked; data that cannot be read is left to the study's own loading,
    which reports it.
    """
    from qerror.data import fashion_mnist_splits

    config = info.config if isinstance(info.config, Mapping) else {}
    recorded = config.get("data")
    if not isinstance(recorded, Mapping):
        return
    try:
        splits = fashion_mnist_splits(data_root, **held_out(info), download=download)
    except (DataNotFoundError, DataError, ValueError):
        return
    recipe = config.get("recipe") if isinstance(config.get("recipe"), Mapping) else {}
    n_test = recipe.get("test_images")
    test = splits.test if not isinstance(n_test, int) or isinstance(n_test, bool) \
        else splits.test.subset(np.arange(min(n_test, len(splits.test))))
    differ = [name for name, key, split in (("train", "train_sha256", splits.train),
                                            ("validation", "val_sha256", splits.val),
                                            ("test", "test_sha256", test))
              if isinstance(recorded.get(key), str) and recorded[key] != split.sha256]
    if differ:
        raise StudyError(
            f"checkpoint {getattr(info, 'path', '')} was trained on other data than the "
            f"Fashion-MNIST folder read here ({splits.test.source}): its {', '.join(differ)} "
            f"split{'s differ' if len(differ) > 1 else ' differs'} from what it recorded "
            f"(read from {recorded.get('source', 'an unrecorded folder')}). Pass --data-root "
            "with the data it was trained on, or "
            + ("train a baseline on this folder with python -m studies.train --data-root "
               f"FOLDER --checkpoint NEW_FILE and pass {use} NEW_FILE" if use else
               "retrain the cached baseline on this folder with python -m studies.train "
               + "".join(f"--{k} {getattr(info, k).value} " for k in ("arch", "stem")
                         if hasattr(getattr(info, k, None), "value"))
               + "--data-root FOLDER --force (it replaces the cache's checkpoint)"))


def refuse_beyond_splits(parser: argparse.ArgumentParser,
                         requests: Mapping[str, tuple[int | None, str]]) -> None:
    """``parser.error`` for an image count asked for by name that is larger than its
    Fashion-MNIST split (:func:`qerror.data.split_images`): ``requests`` maps an option to
    (its value, None when not given; the split). A study would otherwise measure the whole
    split while its manifest recorded the larger request."""
    for option, (value, split) in requests.items():
        most = split_images(split)
        if value is not None and value > most:
            parser.error(f"{option} {value}: Fashion-MNIST's {SPLIT_WORDS[split]} split holds "
                         f"{most:,} images; give at most {most}")


def refuse_seeds_past_64_bits(parser: argparse.ArgumentParser, seed: int, count: int,
                              option: str) -> None:
    """``parser.error`` where a run seeds ``count`` things with ``seed``, ``seed + 1``, ...,
    ``seed + count - 1`` (``option``, e.g. ``"--seeds 20"``, asks for them) and the last
    passes :data:`qerror.MAX_SEED`, the library's largest seed: refused before any work,
    not by the first seed past it once the work before it is done."""
    last = seed + count - 1
    if last > MAX_SEED:
        parser.error(f"--seed {seed} with {option}: the run takes seeds {seed} to {last}, "
                     f"beyond torch's 64-bit seeds; give --seed at most "
                     f"{MAX_SEED + 1 - count}")


def given_options(parser: argparse.ArgumentParser, argv: list[str],
                  parsed: argparse.Namespace) -> set[str]:
    """The destinations of the options ``argv`` gives (``parsed`` is its parse): argv parsed
    again into a namespace that already holds every destination, where argparse sets only
    what the command line gives. Lets a study refuse an option that would change nothing,
    whatever its default. For options that store a value (``store``, ``store_true``, ...,
    ``nargs``); an ``append``, ``count`` or ``extend`` option, which builds on the value
    already there, is refused with a TypeError."""
    unset = object()
    try:
        again = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(parsed),
                                                                         unset)))
    except (TypeError, AttributeError) as err:
        raise TypeError("given_options reads options that store a value; this parser has an "
                        f"append, count or extend option ({err})") from err
    return {k for k, v in vars(again).items() if v is not unset}


def finite_float(text: str) -> float:
    """An argparse ``type=`` for finite floats (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type=`` for finite floats above 0 (``nan``, ``inf``, 0 are refused)."""
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return value


def user_path(text: str) -> Path:
    """An argparse ``type=`` for every path option: ``~`` expands to the home folder.

    A quoted ``~`` is meant as the home folder, not as a folder named ``~`` in the current
    one (``train --checkpoint '~/x.pt'`` made one); :func:`check_out` then refuses an
    ``--out`` of the user's like any folder of theirs.
    """
    return Path(text).expanduser()


def base_parser(study: str, description: str, *, force: bool = False,
                out_default: str | None = None,
                force_also: str | None = None) -> argparse.ArgumentParser:
    """The arguments every study takes: --out, --seed, --smoke; with ``force``, --force.

    A study that passes ``force=True`` calls :func:`check_out` with ``args.force`` before
    its work starts. ``out_default``: a study that chooses its own output folder (``--out``
    then defaults to None) says here, for the help, which one. ``force_also``: what else
    --force lets the study replace (its help says it replaces nothing else).
    """
    parser = argparse.ArgumentParser(prog=f"python -m studies.{study}", description=description)
    parser.add_argument("--out", type=user_path,
                        default=REPO / "runs" / study if out_default is None else None,
                        help=f"output folder (default: {out_default or f'runs/{study}'} under "
                             "the repository); it must not exist, be empty, or hold a previous "
                             "run of this study")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED, "torch's generators take "
                                                   "64-bit seeds"), default=0,
                        help="seed of every random choice (an integer from 0 to 2^64 - 1; "
                             "default 0; torch's CPU draws read its low 32 bits, so seeds "
                             "2^32 apart share them)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny preset for the test suite: same code path, small sizes")
    if force:
        parser.add_argument("--force", action="store_true",
                            help="replace a previous run of this study at --out once this one "
                                 "finishes" + (f", and {force_also}" if force_also else "")
                                 + " (never anything else)")
    return parser


@contextlib.contextmanager
def sigterm_as_sigint():
    """For the block, a SIGTERM (``timeout``, a batch system, torchrun shutting down) is
    taken as Ctrl-C: raised as SIGINT in this process, so the staging folder and temporary
    files are removed and a training run saves its state, as Ctrl-C does (and an optimizer
    update holds it until it ends). Without this, SIGTERM ends the process at once, and
    temporary files of a checkpoint being written stay behind. Only from the main thread,
    and only where SIGTERM has its default action (someone else's handler is theirs)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    def on_sigterm(signum, frame):
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # Ctrl-C ignored (a background job of a shell): SIGTERM's own action, at once
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def check_switches() -> None:
    """StudyError for a switch of the package's (``QERROR_FUSED``, ``QERROR_LAYOUT``) set to
    a value it does not know: refused before any work, as a bad argument is. A run met it at
    its first quantizer call or plain forward, after loading its data and model, as a
    traceback, and a study that made neither call published a manifest recording a value
    that meant nothing."""
    try:
        fused_path_enabled()
        forward_layout()
    except ValueError as err:
        raise StudyError(f"{err}; fix or unset the variable") from None


def study_main(body: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """A study's ``main(argv=None) -> int`` from its body.

    ``main`` reads ``sys.argv[1:]`` when ``argv`` is None and runs ``body(argv)`` with
    denormals flushed to zero (:func:`qerror.cpu.flush_denormal`), restoring the caller's
    setting afterwards: long CPU work slows down several times at random without it, and a
    study run in-process (a test, a notebook) must not leave the process changed.

    Expected failures become one message on stderr, ``[study] error: ...``, and an exit
    status: :class:`StudyError`, :class:`qerror.data.DataNotFoundError`,
    :class:`qerror.data.DataError`, :class:`qerror.nn.models.CheckpointError` and
    :class:`qerror.nn.training.TrainError` (a training request that cannot run; not
    :class:`~qerror.nn.training.DivergedError`, a failure of the run itself) give
    :data:`EXIT_REFUSED`, as does a package switch set to a value it does not know
    (:func:`check_switches`, before the body), an ``OSError``
    (a folder that cannot be written, a full disk) :data:`EXIT_OS_ERROR`, Ctrl-C
    :data:`EXIT_INTERRUPTED`, and so does SIGTERM, taken as Ctrl-C
    (:func:`sigterm_as_sigint`). A Ctrl-C that something swallowed on its way (a weak
    reference's callback, torch's compiler; :mod:`qerror.interrupts` counts each) is found
    before a run is published (:meth:`RunDir.finish` refuses to) and when the body returns
    (one Python dropped as unraisable is raised again where it was dropped): the exit is then
    :data:`EXIT_INTERRUPTED` too. Every interrupted exit says whether a run was published.
    ``SystemExit`` passes through as before (argparse's exit 2, a study's
    ``SystemExit(message)``). Anything else is a bug and keeps its traceback.
    """
    module = body.__module__
    if module == "__main__":  # python -m studies.NAME: the spec keeps the real name
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else Path(sys.argv[0]).stem
    name = module.rpartition(".")[2]

    def main(argv: list[str] | None = None) -> int:
        """Run the study (see the module docstring); ``--help`` lists the arguments."""
        global _GIT_AT_START, _INTERRUPTS_AT_START, _STARTED_AT
        outer = _GIT_AT_START, _INTERRUPTS_AT_START, _STARTED_AT, len(_PUBLISHED)
        _STARTED_AT = time.time()
        _GIT_AT_START, _INTERRUPTS_AT_START = git_identity(), interrupts()
        try:
            with flush_denormal(), sigint_counted(), sigterm_as_sigint():
                check_switches()
                status = body(sys.argv[1:] if argv is None else list(argv))
                # a Ctrl-C that something swallowed (qerror.interrupts) is still the user's,
                # unless the body took it and said so itself
                if interrupts() != _INTERRUPTS_AT_START and status != EXIT_INTERRUPTED:
                    raise KeyboardInterrupt
                return status
        except DivergedError:
            raise  # the run itself failed: keep its traceback
        except (StudyError, DataNotFoundError, DataError, CheckpointError, TrainError) as err:
            print(f"[{name}] error: {err}", file=sys.stderr)
            return EXIT_REFUSED
        except OSError as err:
            print(f"[{name}] error: {err}", file=sys.stderr)
            return EXIT_OS_ERROR
        except PublishedInterrupt as err:
            print(f"[{name}] interrupted after the run was published: {err}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except KeyboardInterrupt:
            if len(_PUBLISHED) > outer[3]:  # a Ctrl-C in the body's work after publishing
                print(f"[{name}] interrupted after the run was published: it is complete at "
                      f"{_PUBLISHED[-1]}", file=sys.stderr)
            else:
                print(f"[{name}] interrupted: nothing was published (its staging folder was "
                      "removed)", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            _GIT_AT_START, _INTERRUPTS_AT_START, _STARTED_AT = outer[:3]
            del _PUBLISHED[outer[3]:]

    return main


# --------------------------------------------------------------------------- output folder


def previous_run(folder: Path) -> dict[str, Any] | None:
    """The manifest of the study run in ``folder``, or None when it holds none."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(manifest, dict) and isinstance(manifest.get("outputs"), dict):
        return manifest
    return None


def is_smoke_run(manifest: dict[str, Any]) -> bool:
    """Whether a study's manifest is of a ``--smoke`` run (a test-sized preset, whose
    figures are never reported): its command line says so, or its configuration does."""
    return ("--smoke" in (manifest.get("argv") or [])
            or (manifest.get("config") or {}).get("smoke") is True)


def manifest_shape(manifest: object) -> str | None:
    """What ``manifest`` holds in a shape no study writes, among the fields its readers take
    (the paper's build and the README's records: outputs, argv, git and its commit, config,
    the trained models and their checkpoints' sha256, timing_outputs), or None.

    Valid JSON of another shape (edited by hand, or another program's) would otherwise stop
    a reader with a TypeError or AttributeError far from the file, or be read letter by
    letter (an argv that is a string)."""
    kinds = {list: "a JSON array", str: "a JSON string", type(None): "null", bool: "a boolean",
             int: "a number", float: "a number"}
    if not isinstance(manifest, dict):
        return kinds[type(manifest)]
    argv, git = manifest.get("argv") or [], manifest.get("git") or {}
    models = manifest.get("models") or {}
    found = [manifest.get("model")] + (list(models.values()) if isinstance(models, dict)
                                       else [])
    for what, ok in (
            ("outputs that are no object", isinstance(manifest.get("outputs", {}), dict)),
            ("an argv that is no list of words",
             isinstance(argv, list) and all(isinstance(a, str) for a in argv)),
            ("a git that is no object", isinstance(git, dict)),
            ("a commit that is no text",
             not isinstance(git, dict) or isinstance(git.get("commit") or "", str)),
            ("a config that is no object", isinstance(manifest.get("config") or {}, dict)),
            ("a model that is no object", isinstance(manifest.get("model") or {}, dict)),
            ("models that are no object", isinstance(models, dict)),
            ("timing_outputs that are no list",
             isinstance(manifest.get("timing_outputs") or [], list)),
            ("a checkpoint sha256 that is no text",
             all(isinstance(m.get("sha256") or "", str) for m in found
                 if isinstance(m, dict)))):
        if not ok:
            return what
    return None


def first_three(items: list[str]) -> str:
    """The first three of ``items`` joined by ", ", and ", ..." where there are more: the
    list a refusal names beside its count."""
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")


def _check_replaceable(final: Path, study: str, force: bool) -> None:
    """StudyError unless the existing folder ``final`` may become the output of ``study``."""
    entries = sorted(p.name for p in final.iterdir())
    if not entries:
        return
    manifest = previous_run(final)
    # inside a user's folder, but beside another study's run: a folder inside a run is an
    # item its manifest does not list, and that run could no longer be replaced
    other = final / study if manifest is None else final.parent / study
    elsewhere = f"--out {other}" if not (other.exists() or other.is_symlink()) else \
        "--out with a new folder"
    if manifest is None:
        shown = first_three(entries)
        held = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
        raise StudyError(
            f"--out {final} is a folder that holds {held} ({shown}) and is "
            f"not a run of a study (it has no study's {MANIFEST}); it is never replaced, with "
            f"--force neither. Pass a new or empty folder, e.g. {elsewhere}")
    if manifest.get("study") != study:
        raise StudyError(
            f"--out {final} holds a run of the {manifest.get('study')!r} study, not of "
            f"{study!r}; it is never replaced by another study, with --force neither. Pass a "
            f"new or empty folder, e.g. {elsewhere}")
    extra = _unlisted(final, set(manifest["outputs"]) | {MANIFEST})
    if extra:
        shown = first_three(extra)
        raise StudyError(
            f"--out {final} holds a run of the {study} study and also {len(extra)} item(s) "
            f"its manifest does not list ({shown}); they would be lost, so it is not "
            f"replaced, with --force neither. Move them away or pass another --out")
    changed = _changed_outputs(final, manifest["outputs"])
    if changed:
        shown = first_three(changed)
        raise StudyError(
            f"--out {final} holds a run of the {study} study whose {len(changed)} file(s) "
            f"{shown} changed since it wrote them (their sha256 is not the one its "
            f"{MANIFEST} records: edited by hand, or replaced); the changes would be lost, so "
            "it is not replaced, with --force neither. Copy them away, or pass another --out")
    if not force:
        raise StudyError(
            f"--out {final} holds a previous run of the {study} study; pass --force to "
            f"replace it when this run finishes, or another --out")


def _unlisted(final: Path, listed: set[str]) -> list[str]:
    """The entries of the run folder ``final`` that replacing it would lose and its manifest
    does not list: files and links it does not name, anything that is not a plain file or a
    link (a named pipe, a socket), and folders that hold none of its files (an empty one
    too); paths relative to ``final``, sorted. Links are not followed."""
    keep = {str(parent) for name in listed for parent in Path(name).parents}
    extra = []
    for root, dirs, files in os.walk(final):
        for name in (*dirs, *files):
            p = Path(root, name)
            rel = str(p.relative_to(final))
            if p.is_symlink():
                if rel not in listed:
                    extra.append(rel)
            elif p.is_dir():
                if rel not in keep:
                    extra.append(rel + "/")
                    dirs.remove(name)  # what it holds goes with it, named once
            elif rel not in listed or not p.is_file():
                extra.append(rel)
    return sorted(extra)


def _changed_outputs(final: Path, outputs: Mapping[str, object]) -> list[str]:
    """The files of the run folder ``final`` that its manifest lists (``outputs``: path to
    sha256) and whose content is no longer what the run wrote, or cannot be read; sorted.
    A listed file that is gone loses nothing."""
    changed = []
    for name, recorded in outputs.items():
        path = final / name
        if not os.path.lexists(path):
            continue
        try:
            if sha256_file(path) != recorded:
                changed.append(name)
        except OSError:
            changed.append(name)
    return sorted(changed)


def _manifest_sha(folder: Path) -> str | None:
    """The sha256 of the manifest of the run in ``folder`` (None: it has none): which run
    it is."""
    try:
        return sha256_file(Path(folder) / MANIFEST)
    except OSError:
        return None


@contextlib.contextmanager
def _signals_held():
    """For the block, SIGINT and SIGTERM wait: their handlers are replaced by one that notes
    them, and on leaving the block the previous handlers are put back and each noted signal
    is raised again for them (a Ctrl-C then raises KeyboardInterrupt there). For a few
    renames that must happen together. A handler, not a signal mask: a process-directed
    signal that the main thread masks is taken by another of its threads (torch's), whose
    C handler flags it for the main thread all the same. From the main thread only (where
    Python runs its handlers); signals ignored, or whose handler Python did not install,
    keep theirs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None and handler is not signal.SIG_IGN:
            previous[sig] = handler
            signal.signal(sig, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(noted):
            signal.raise_signal(sig)


def _beside(final: Path, kind: str, pid: int | None = None) -> Path:
    """The name this process (or process ``pid``) gives a folder beside ``final``: its
    staging folder (``partial``, ``.NAME.partial-PID``), the previous run moved aside
    (``old``, ``.NAME.old-PID``), or a finished run that could not take ``final``'s place
    (``finished``, ``NAME.finished-PID``)."""
    dot = "" if kind == "finished" else "."
    return final.parent / f"{dot}{final.name}.{kind}-{os.getpid() if pid is None else pid}"


def out_name_room(out: Path) -> tuple[int, int]:
    """``(longest, room)``: the longest file name ``out``'s folder takes
    (:func:`~qerror.files.name_max`), and the longest name ``out`` itself may have there,
    so that the folders a run is staged in beside it (``.NAME.partial-PID`` and the like,
    whose names add the most bytes to ``out``'s) fit too, whatever the process id
    (:data:`PID_DIGITS`)."""
    pid = 10 ** PID_DIGITS - 1
    return name_room(out, [_beside(out, kind, pid).name
                           for kind in ("partial", "old", "finished")])


def clean_stale_partials(final: Path) -> list[Path]:
    """Remove the staging folders that killed runs aimed at ``final`` left behind.

    Only folders named ``.NAME.partial-PID`` (a staged run) or ``.NAME.old-PID`` (a run it
    replaced, whose removal was cut short) in ``final``'s parent (NAME being ``final``'s
    name), not symbolic links, that hold the :data:`STAGING_MARK` a study puts in the
    folders it makes (a user's folder of the same name is left alone), and only when no
    process ``PID`` is alive: a run in progress keeps its folders. Returns the folders
    removed. A folder that cannot be removed (it holds a file this process may not remove)
    is left, still marked (its mark goes last), and the run goes on: a later one removes it
    once it can.

    A replaced run's copy (``.NAME.old-PID``) while nothing is at ``final`` and the new run
    still lies under its staging name (``.NAME.partial-PID``, of the same PID) is the
    previous run of a process killed between its two renames: it is put back at ``final``,
    not removed (the new one, unmarked, is never removed). Without that staging folder the
    new run had taken ``final``'s place (since moved away by the user), and the copy is what
    a removal cut short left, some of its files gone and its manifest perhaps not: it is
    removed, never put back at ``final`` as a run that looks complete.
    """
    final = Path(final)
    pattern = re.compile(re.escape(f".{final.name}.") + r"(partial|old)-([0-9]+)")
    removed = []
    for p in sorted(final.parent.glob(f".{glob.escape(final.name)}.*-*")):
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and _marked(p) and not process_alive(int(m[2])):
            staged = final.parent / f".{final.name}.partial-{m[2]}"  # its new run
            if m[1] == "old" and not (final.exists() or final.is_symlink()) \
                    and staged.is_dir() and not staged.is_symlink():
                (p / STAGING_MARK).unlink()
                p.rename(final)
                continue
            try:
                _remove_marked(p)
            except OSError:  # not in this run's way: it stays marked for a later one
                continue
            removed.append(p)
    return removed


def _marked(folder: Path) -> bool:
    """Whether ``folder`` holds the :data:`STAGING_MARK` (a plain file, not a link)."""
    mark = folder / STAGING_MARK
    return mark.is_file() and not mark.is_symlink()


def _folder_id(folder: Path) -> tuple[int, int]:
    """``(device, inode)`` of ``folder`` itself (a link not followed): which folder it is,
    whatever its name."""
    st = os.stat(folder, follow_symlinks=False)
    return st.st_dev, st.st_ino


def _mark(folder: Path) -> None:
    (folder / STAGING_MARK).write_text(f"made by a qerror study, process {os.getpid()}\n")


def _remove_marked(folder: Path) -> None:
    """Remove a marked folder, its mark last: cut short (Ctrl-C, a kill), what is left is
    still marked, and the next run aimed at the same ``--out`` removes it."""
    for child in folder.iterdir():
        if child.name == STAGING_MARK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    shutil.rmtree(folder)


def staging_folder(final: Path, whose: str = "this folder", hint: str = "") -> Path:
    """A new, empty staging folder ``.NAME.partial-PID`` beside ``final``, marked with
    :data:`STAGING_MARK`: killed before it is published, it is removed by the next
    :func:`clean_stale_partials` aimed at ``final``. This process's own earlier one is
    replaced.

    Raises
    ------
    StudyError
        When something not made by a study is in the way (``whose`` names what is staged,
        ``hint`` ends the message).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = _beside(final, "partial")
    if stage.exists() and not stage.is_symlink() and _marked(stage):
        shutil.rmtree(stage)  # this process's own, from an earlier one
    elif stage.exists() or stage.is_symlink():
        raise StudyError(f"{stage} is in the way of {whose}'s staging folder and was not "
                         f"made by a study; move or rename it{', ' + hint if hint else ''}")
    stage.mkdir()
    _mark(stage)
    return stage


def publish_folder(stage: Path, final: Path, *,
                   check: Callable[[Path], None] | None = None,
                   rescue: Callable[[Exception, Path | None], None] | None = None) -> Path:
    """Put the complete staging folder ``stage`` (from :func:`staging_folder`) at ``final``,
    replacing what is there, by renames: the previous ``final`` is moved aside (to
    ``.NAME.old-PID``, marked) before ``stage`` takes its place, and removed only then.

    Every file and folder in ``stage`` is flushed to the disk first, and ``final``'s folder
    after the renames (:func:`qerror.files.sync_tree`, :func:`qerror.files.sync_folder`): a
    power cut leaves the previous folder or the complete new one, never a new one whose
    files are empty.

    Ctrl-C and SIGTERM wait for both renames (:func:`_signals_held`), so an interruption
    leaves either the previous folder or the new one at ``final``, never a mixture; a
    process killed outright between them leaves nothing at ``final`` and the previous
    folder marked beside it (put back by the next :func:`clean_stale_partials`). If the
    publish fails, the previous folder is put back (where nothing has taken its place; else
    it stays aside, unmarked, never removed as left behind), ``stage`` stays marked, and the
    error is raised, never hidden by a Ctrl-C that waited for it. Returns ``final``.

    Parameters
    ----------
    stage, final : Path
        The staged folder and its destination.
    check : callable, optional
        ``check(old)`` is called on the previous folder just after it was moved aside, before
        it is marked: an exception it raises fails the publish (a folder that another
        process put at ``final`` meanwhile is not this publish's to replace).
    rescue : callable, optional
        ``rescue(err, old)`` is called, Ctrl-C still waiting, when the publish fails with an
        OSError or StudyError ``err``, after the previous folder was put back where it could
        be (``old``: where it still lies, None when it is back or was never moved); what it
        raises is raised instead of ``err``.

    Raises
    ------
    StudyError
        When ``final`` is a file or a symbolic link (never replaced); and when the previous
        folder's copy cannot be removed (a file the process may not remove): ``stage`` is
        at ``final``, complete, and the message says so and where the copy is.
    PublishedInterrupt
        A Ctrl-C or SIGTERM that came while the folders moved, or while the previous one was
        removed: ``stage`` is at ``final``, complete.
    """
    stage, final = Path(stage), Path(final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise StudyError(f"{final} is a file or a symbolic link, not a folder; it is never "
                         "replaced. Move it away and run again")
    sync_tree(stage)  # its files' content on the disk before the rename that shows them
    old = _beside(final, "old")
    moved = published = False
    failure: BaseException | None = None
    try:
        with _signals_held():
            try:
                if final.exists() or final.is_symlink():
                    final.rename(old)
                    moved = True
                    if check is not None:
                        check(old)
                    _mark(old)  # removable as left behind if this process dies now
                # unmarked: the folder becomes the published one (killed between the two
                # steps, a complete folder is left unmarked, never removed)
                (stage / STAGING_MARK).unlink(missing_ok=True)
                stage.rename(final)
                _PUBLISHED.append(final)
                published = True
            except BaseException as err:
                failure = err
                if stage.is_dir() and not (stage / STAGING_MARK).exists():
                    with contextlib.suppress(OSError):
                        _mark(stage)  # not published: removable as left behind
                if moved:
                    with contextlib.suppress(OSError):
                        (old / STAGING_MARK).unlink(missing_ok=True)
                        if not (final.exists() or final.is_symlink()):
                            old.rename(final)
                            moved = False
                if rescue is not None and isinstance(err, (OSError, StudyError)):
                    try:
                        rescue(err, old if moved else None)
                    except BaseException as rescued:
                        failure = rescued
                        raise
                raise
    except KeyboardInterrupt as interrupt:
        if failure is not None and failure is not interrupt:
            raise failure from None  # a Ctrl-C held while it failed: the failure is said
        if not published:
            raise
        interrupted = True  # held while the folder moved into place: it is there
    else:
        interrupted = False
    sync_folder(final.parent)  # both renames on the disk before the previous folder goes
    if moved:
        try:
            _remove_marked(old)
        except KeyboardInterrupt:
            raise PublishedInterrupt(
                f"it is complete at {final}; the previous one's copy at {old} was not fully "
                f"removed (the next run aimed at {final} removes it)") from None
        except OSError as err:  # published: said as such, not as a bare errno
            raise StudyError(
                f"the run is complete at {final}, but the previous one's copy at {old} could "
                f"not be removed ({err.strerror}: {err.filename}); remove it by hand") from err
    if interrupted:
        raise PublishedInterrupt(f"it is complete at {final}")
    return final


def check_writable_parent(target: Path, option: str, *, why: str = "", hint: str = "",
                          instead: str | None = None) -> Path:
    """The folder that will hold ``target`` (its nearest existing ancestor), checked to be a
    folder this process can create files in, by creating and removing a probe file there.

    For an option's file or folder, before any work starts: a study that learns only at its
    first write that it cannot write loses the work before it.

    Raises
    ------
    StudyError
        Naming ``option`` and ``target``; ``why`` follows the reason, ``hint`` ends the
        message; ``instead`` replaces its advice (to pass ``option`` in another folder).
    """
    parent = Path(target).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StudyError(f"{option} {target}: {parent} is a file, so nothing can be made in "
                         f"it; {instead or f'pass {option} in a folder'}{hint}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".qerror-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise StudyError(f"{option} {target}: cannot write in {parent} ({err.strerror}){why}; "
                         f"{instead or f'pass {option} in a folder you can write to'}{hint}"
                         ) from err
    return parent


def _check_emptiable(final: Path) -> None:
    """StudyError unless this process can list, make and remove files in the folder
    ``final`` and in every folder under it (links not followed), by a probe file in each.

    Publishing a run over an existing ``--out`` (an empty folder, a previous run) moves it
    aside, marks it and removes what it holds: a folder that refuses it (read-only, not
    listable) was found only once the run was done, which then was kept beside ``--out``,
    and a read-only folder inside a previous run failed the removal after the new run was
    published, leaving the old copy beside it."""
    def refuse(folder: str, err: OSError) -> None:
        raise StudyError(
            f"--out {final}: cannot write in {folder} ({err.strerror}), and a run replaces "
            f"what is at --out by emptying it once the work is done; make it writable "
            f"(chmod -R u+w {final}) or pass a new folder as --out") from err

    def unlisted(err: OSError) -> None:
        refuse(err.filename, err)

    for root, _, _ in os.walk(final, onerror=unlisted):
        try:
            fd, probe = tempfile.mkstemp(prefix=".qerror-probe-", dir=root)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            refuse(root, err)


def check_out(out: Path, study: str, *, force: bool) -> Path:
    """The resolved output folder of ``study``, checked before any work starts.

    ``out`` may not exist, be an empty folder, or hold a previous run of ``study`` (its
    manifest names the study and lists every file in the folder), which is replaced only
    when ``force``. Its name must leave room for the names of the folders a run is staged
    in beside it (``.NAME.partial-PID`` and the like) within the file system's limit. The
    folder that will hold it must be writable: a probe file is created and removed there
    (in the nearest existing ancestor when the parent does not exist yet), and so must an
    existing ``out`` and every folder in it, which the run empties when it replaces them
    (:func:`_check_emptiable`). Stale staging folders of killed runs are removed
    (:func:`clean_stale_partials`).

    Raises
    ------
    StudyError
        With what is wrong and what to pass instead.
    """
    try:
        final = Path(out).expanduser().resolve()
    except (RuntimeError, OSError) as err:  # a loop of symbolic links (RuntimeError <3.13)
        raise StudyError(f"--out {out}: cannot follow it to a folder ({err}); pass a folder "
                         "that is not a loop of symbolic links") from err
    # the run is staged beside --out under a longer name: a name that is legal but leaves
    # no room for it would fail only once the work is done (train: after training); checked
    # first, as a longer name than the file system takes is an OSError wherever it is used
    longest, room = out_name_room(final)
    if name_bytes(final.name) > room:
        raise StudyError(f"--out {final}: its name is {name_bytes(final.name)} bytes, and a "
                         "run is staged beside it under a longer one (.NAME.partial-PID, "
                         f"{name_bytes(final.name) + longest - room} bytes here), over the "
                         f"{longest} bytes a file name may have there; pass an --out whose "
                         f"name is at most {room} bytes")
    if final.exists() and not final.is_dir():
        raise StudyError(f"--out {final} is a file, not a folder; it is never replaced. Pass "
                         f"the name of a new folder, e.g. --out {final.parent / study}")
    if final.is_dir() and os.path.ismount(final):
        # The run is staged beside --out and moved into place: a mount point (a container's
        # volume) cannot be moved, and the finished run would have nowhere to go.
        raise StudyError(f"--out {final} is a mount point; a run is written beside its "
                         f"folder and then moved into place, which a mount point does not "
                         f"allow. Pass a folder inside it, e.g. --out {final / study}")
    if final.is_dir():
        _check_replaceable(final, study, force)
    inside = (f"; {final} itself is a folder you can write in, so pass a new folder inside "
              f"it, e.g. --out {final / study}"
              if final.is_dir() and os.access(final, os.W_OK | os.X_OK) else "")
    check_writable_parent(final, "--out", why=", where the run is staged before it is moved "
                          "into place", hint=inside)
    if final.is_dir():
        _check_emptiable(final)
    if final.parent.is_dir():
        clean_stale_partials(final)
    return final


# --------------------------------------------------------------------------- analysis

def holm_columns(frame: pd.DataFrame, columns: list[str],
                 rows: pd.Series | None = None) -> pd.DataFrame:
    """``frame`` with a column ``C_holm`` beside each p-value column ``C``: the p-values of
    those columns in ``rows`` (default all), every one a test of one family, adjusted
    together by Holm's step-down procedure (:func:`qerror.stats.holm`: the family-wise
    error rate at α under any dependence between the tests); NaN where ``C`` is (no test)
    or outside ``rows``. Columns that ``frame`` lacks are left out."""
    columns = [c for c in columns if c in frame]
    frame = frame.copy()
    keep = np.ones(len(frame), bool) if rows is None else rows.to_numpy(bool)
    values = frame[columns].to_numpy(float).copy()
    tested = np.isfinite(values) & keep[:, None]
    values[tested] = holm(values[tested])
    values[~tested] = np.nan
    for j, c in enumerate(columns):
        frame[f"{c}_holm"] = values[:, j]
    return frame


def available_memory() -> int | None:
    """Bytes of memory the kernel says can be given to a new process without swapping
    (``MemAvailable`` of ``/proc/meminfo``), or None where that is not known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


#: The help of every study's ``--data-root``.
DATA_ROOT_HELP = ("folder with the Fashion-MNIST IDX files (default: $QERROR_DATA if set, else "
                  "the user cache's data folder, else /usr/share/datasets/fashion-mnist)")


def _timing_bar(total: int, unit: str, progress: bool = True):
    """A progress bar over timing rounds, updated between them (never inside a timed call),
    gone once they are done; none drawn where ``progress`` is False."""
    from tqdm import tqdm

    return tqdm(total=total, desc="timing", unit=unit, leave=False, mininterval=1.0,
                disable=not progress)


def paired_ratio(candidate: Callable[[], object], baseline: Callable[[], object],
                 pairs: int, warmup: int = 1, progress: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Times of candidate and baseline run alternately, each first in every other pair
    (:func:`alternating_times`, after ``warmup`` untimed pairs), and their per-pair ratios
    (with a progress bar over the pairs where ``progress``)."""
    for _ in range(warmup):
        candidate()
        baseline()
    t = alternating_times([lambda i: candidate(), lambda i: baseline()], pairs, progress)
    ta, tb = t[:, 0].copy(), t[:, 1].copy()
    return ta / tb, ta, tb


def round_order(n: int, i: int) -> np.ndarray:
    """The order in which :func:`alternating_times` runs its ``n`` candidates in round ``i``:
    the rotation by ``i // 2`` of ``0, ..., n - 1``, reversed in odd rounds. Every two rounds
    run each two candidates once in each order, as far apart, so that a drift of the
    machine's speed, or a neighbour that warms or spoils a cache, favours neither side of a
    per-round ratio (a rotation alone put one candidate of three before another in two
    rounds of three)."""
    order = np.roll(np.arange(n), -(i // 2))
    return order[::-1] if i % 2 else order


def alternating_times(fns: list[Callable[[int], object]], rounds: int,
                      progress: bool = True) -> np.ndarray:
    """Seconds of each of ``fns`` on call ``i`` (``fn(i)``), run one after the other for
    each ``i`` in the order :func:`round_order` gives, so that no candidate always runs
    first, or before another (after a cache-warming, or a cache-spoiling, neighbour).
    Shape (rounds, len(fns)); a progress bar over the rounds where ``progress``."""
    times = np.empty((rounds, len(fns)))
    with _timing_bar(rounds, "round", progress) as bar:
        for i in range(rounds):
            for j in round_order(len(fns), i):
                t0 = time.perf_counter()
                fns[j](i)
                times[i, j] = time.perf_counter() - t0
            bar.update(1)
    return times


#: The fewest timings whose 99th percentile is reported: with fewer, numpy's interpolated
#: estimate puts more weight on the single largest timing than on any other (at 15 timings
#: 0.86 of it), a maximum under another name.
P99_MIN_TIMINGS = 100


def p99(times) -> float:
    """The 99th percentile of ``times`` (numpy's linear interpolation), NaN for fewer than
    :data:`P99_MIN_TIMINGS` of them."""
    t = np.asarray(times, float)
    return float(np.percentile(t, 99)) if t.size >= P99_MIN_TIMINGS else math.nan


def tail_note(a, b, unit_scale: float = 1e3, unit: str = "ms") -> str:
    """"p99 A vs B ms" of two equally long series of timings (seconds), or, with fewer
    than :data:`P99_MIN_TIMINGS` of them, "max A vs B ms" (see :func:`p99`)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size >= P99_MIN_TIMINGS:
        return f"p99 {unit_scale * p99(a):.2f} vs {unit_scale * p99(b):.2f} {unit}"
    return f"max {unit_scale * a.max():.2f} vs {unit_scale * b.max():.2f} {unit}"


def wrapped_columns(*widths: float) -> str:
    """LaTeX column specs of text columns wrapped ragged-right at these fractions of the
    line width (needs ``\\usepackage{array}``), for ``column_format``."""
    return "".join(f">{{\\raggedright\\arraybackslash}}p{{{w:g}\\linewidth}}" for w in widths)


# The commit a running study started from (set by study_main): the code that ran is that
# commit's, whatever the checkout holds by the time the results are written.
_GIT_AT_START: dict[str, Any] | None = None
# The SIGINTs counted when it started (qerror.interrupts): one more by the time a run would
# be published was swallowed somewhere, and the run is not published.
_INTERRUPTS_AT_START: int | None = None
# When it started (time.time()): a run's manifest times the whole study, not only the
# writing of its outputs (a study may open its RunDir after its work).
_STARTED_AT: float | None = None
# The runs published since (their folders), for a Ctrl-C found after one was.
_PUBLISHED: list[Path] = []


#: The folders of the code a run executes: an untracked file in them (a new module it
#: imported) is no more in the commit than a changed one. Untracked files elsewhere (a user's
#: notes, outputs) are not the code.
CODE_FOLDERS = ("qerror", "studies", "paper")


def git_identity() -> dict[str, Any]:
    """Commit and whether the work tree differs from it: a tracked file changed, or an
    untracked file in :data:`CODE_FOLDERS` (None for both outside a git checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no") != "" or git(
            "status", "--porcelain", "--untracked-files=all", "--", *CODE_FOLDERS) != ""
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


#: Environment variables that set how many threads run, or cap which instruction set a
#: library's kernels use (ATen, oneDNN, FBGEMM, MKL): a timing or a float sum depends on them,
#: and the CPU's flags alone do not say they were set (FBGEMM_ENABLE_INSTRUCTIONS=AVX2 makes
#: FBGEMM saturate its int16 pair sums on a CPU with AVX512-VNNI).
THREAD_AND_ISA_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                            "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                            "FBGEMM_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_AVX512_256",
                            "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_DEFAULT_FPMATH_MODE")


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def machine_identity() -> dict[str, Any]:
    """The manifest's ``machine``: CPUs, the CPU's model, torch's intra- and inter-op thread
    counts at the end of the run, and the thread and instruction-set variables set in the
    environment (:data:`THREAD_AND_ISA_VARIABLES`: oneDNN's cap to AVX2 kernels on an AVX-512
    CPU, unlike ATen's, shows nowhere else in the manifest)."""
    import torch

    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "environment": {k: os.environ[k] for k in THREAD_AND_ISA_VARIABLES
                            if k in os.environ}}


def machine_load() -> dict[str, float]:
    """What else the machine runs now: ``load_average`` (the last minute's run-queue length,
    NaN where the system does not say) and ``usable_cpus`` (the CPUs this process may run
    on). A load above the CPUs means the timings taken now are longer than a quiet
    machine's, by a factor that changes from moment to moment: small-batch passes suffer
    most (each multi-threaded kernel waits for its slowest thread)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = math.nan
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return {"load_average": float(load), "usable_cpus": float(cpus)}


class RunDir:
    """A study's output folder, staged and published atomically.

    Parameters
    ----------
    out : Path
        Final destination: it must not exist, be empty, or hold a previous run of the same
        study (:func:`check_out`; nothing else is ever replaced). A previous run is
        replaced only when the new one finishes, and only with ``force``.
    study : str
        Study name, recorded in the manifest.
    argv : list of str
        The command-line arguments, recorded verbatim.
    config : dict
        Resolved configuration (dataclasses and enums are serialised).
    force : bool
        The study's ``--force``: whether a previous run of the study at ``out`` may be
        replaced. The study checks it with :func:`check_out` before its work too (a
        refusal then costs nothing); this check finds a run that appeared at ``out`` while
        the study worked.

    Notes
    -----
    The manifest records wall-clock times (``started_unix``, ``seconds``: when the study
    started, under :func:`study_main`, else when this folder was opened, and the seconds from
    then until the manifest was written) and names the outputs that hold measured times
    (``timing_outputs``, written with ``timing=True``); every other output is the same bytes
    when the same command runs again with the same seed.
    """

    def __init__(self, out: Path, study: str, argv: list[str], config: dict[str, Any], *,
                 force: bool):
        # force: the study's --force, checked again here (its own check_out, before its
        # work, found --out as it was then): a run that appeared at --out meanwhile (another
        # run aimed at the same folder) is not replaced without it. No default, so that no
        # study can forget to pass it.
        self.final = check_out(out, study, force=force)
        # A previous run at --out now was allowed by the study's own check_out (--force);
        # one that appears while this run works (another run aimed at the same folder) was
        # not, and is never replaced by finish().
        self.replaces = self.final.is_dir() and any(self.final.iterdir())
        # ... and which run it is: another run aimed at the same folder with --force may
        # replace it first, and its run is not this one's to replace
        self.replaced = _manifest_sha(self.final) if self.replaces else None
        self.stage = staging_folder(self.final, "this run", "or choose another --out")
        self._stage_id = _folder_id(self.stage)  # which folder it is (_check_stage)
        self.study = study
        self.argv = list(argv)
        self.config = config
        self.extra: dict[str, Any] = {}
        self.timing_outputs: set[str] = set()
        self.started = _STARTED_AT if _STARTED_AT is not None else time.time()
        self.git = dict(_GIT_AT_START) if _GIT_AT_START is not None else git_identity()
        self.interrupts = (_INTERRUPTS_AT_START if _INTERRUPTS_AT_START is not None
                           else interrupts())
        self.kept = False  # finish() kept a complete run it could not move to --out

    def path(self, name: str) -> Path:
        """Where to write the output ``name`` (its folders made), in the staging folder,
        which must still be the one this run made (:meth:`_check_stage`)."""
        self._check_stage()
        p = self.stage / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _own_stage(self) -> bool:
        """Whether the folder at ``self.stage`` is the marked one this run made (not one
        made there after it was removed: another folder, or, its number used again, one
        without the mark)."""
        try:
            return _folder_id(self.stage) == self._stage_id and _marked(self.stage)
        except OSError:
            return False

    def _check_stage(self) -> None:
        """StudyError unless the staging folder is the marked one this run made.

        Removed while the run worked, what was written before is gone: a folder made again
        by the next write would be published with the later files alone, under a manifest
        that lists just those, looking complete."""
        if not self._own_stage():
            raise StudyError(
                f"this run's staging folder {self.stage} was removed while the run worked "
                "(by hand, by another run aimed at the same --out in this process, or by one "
                "on another machine or in another container, which cannot see this process "
                "running); what it wrote there is lost, so nothing was published. Run again")

    def write_text(self, name: str, text: str, *, timing: bool = False) -> Path:
        """Write a text file in UTF-8, whatever the locale (a LaTeX table's σ failed, after
        the work, under a Latin-1 or ASCII one); ``timing`` marks it as holding measured times
        (see Notes)."""
        p = self.path(name)
        p.write_text(text, encoding="utf-8")
        if timing:
            self.timing_outputs.add(name)
        return p

    def write_json(self, name: str, obj, *, timing: bool = False) -> Path:
        """Write strict JSON, keys sorted, a float that is not finite as ``null``
        (:func:`qerror.files.json_text`); ``timing`` marks it as holding measured times."""
        return self.write_text(name, json_text(obj), timing=timing)

    def write_csv(self, name: str, frame, *, timing: bool = False) -> Path:
        """Write a frame as CSV; ``timing`` marks it as holding measured times (see Notes)."""
        p = self.path(name)
        frame.to_csv(p, index=False)
        if timing:
            self.timing_outputs.add(name)
        return p

    def write_latex_table(self, name: str, frame, caption: str, label: str,
                          float_format: str = "%.4g", column_format: str | None = None, *,
                          timing: bool = False) -> Path:
        """A booktabs table (needs ``\\usepackage{booktabs}``), with readable headers
        (:func:`studies._latex.readable`); ``column_format`` as LaTeX's (default one ``l``
        or ``r`` per column, pandas' choice); ``timing`` as for :meth:`write_text`."""
        body = readable(frame).to_latex(index=False, float_format=float_format.__mod__,
                                        escape=False, na_rep="--", column_format=column_format)
        text = ("\\begin{table}[t]\n\\centering\n\\small\n" + body
                + f"\\caption{{{caption}}}\n\\label{{{label}}}\n\\end{{table}}\n")
        return self.write_text(name, text, timing=timing)

    def write_goals_table(self, name: str, frame, caption: str, label: str) -> Path:
        """A study's goals (three columns: the goal, what was measured, the verdict) with
        the two text columns wrapped at fixed widths, so that the table keeps the text's
        size at the paper's line width instead of shrinking to fit one line per goal
        (needs ``\\usepackage{array}``)."""
        if frame.shape[1] != 3:
            raise ValueError(f"a goals table has three columns, got {list(frame.columns)}")
        return self.write_latex_table(name, frame, caption, label,
                                      column_format=wrapped_columns(0.33, 0.45, 0.12))

    def write_macros(self, name: str, macros: dict[str, str]) -> Path:
        """``\\newcommand`` definitions, so the paper's text never holds a typed number.

        Each key is prefixed with the study's name (:func:`studies._latex.macro_name`).
        """
        lines = [f"% generated by python -m studies.{self.study}; do not edit"]
        for key, value in sorted(macros.items()):
            lines.append(f"\\newcommand{{\\{macro_name(self.study, key)}}}{{{value}}}")
        return self.write_text(name, "\n".join(lines) + "\n")

    def save_figure(self, fig, stem: str, *, timing: bool = False) -> list[Path]:
        """PDF for LaTeX and PNG for a quick look; ``timing`` marks both as drawn from
        measured times (see Notes).

        The PDF carries no creation date, so a rerun writes the same bytes (the PNG has
        none by default).
        """
        paths = []
        for ext, kwargs in (("pdf", {"metadata": {"CreationDate": None}}), ("png", {"dpi": 150})):
            p = self.path(f"{stem}.{ext}")
            fig.savefig(p, bbox_inches="tight", **kwargs)
            paths.append(p)
            if timing:
                self.timing_outputs.add(f"{stem}.{ext}")
        return paths

    def _git(self) -> dict[str, Any]:
        """The commit the run started from (its study's start, else this folder's), and the
        checkout's state at the end where it differs: code changed under a running study."""
        now = git_identity()
        return self.git if now == self.git else {**self.git, "at_finish": now}

    def finish(self) -> Path:
        """Write the manifest and move the staged folder to its destination, by
        :func:`publish_folder` (which removes the previous run, if any, once it is in place).

        Raises ``KeyboardInterrupt`` (the staging folder is then removed on leaving the
        ``with`` block) when a Ctrl-C came since the study started and something swallowed
        it (:mod:`qerror.interrupts`): a run the user interrupted is not published;
        :class:`PublishedInterrupt` for a Ctrl-C while it moved into place (it is there);
        StudyError when it cannot go to ``--out`` (another run there now, a file, a link, a
        failed rename): the complete run is kept beside it, named in the message."""
        self._check_interrupts()
        self._check_stage()
        # the mark is not an output: it stays until the folder is published (a run killed
        # before then leaves a marked staging folder, which the next run removes)
        outputs = {str(p.relative_to(self.stage)): sha256_file(p)
                   for p in sorted(self.stage.rglob("*"))
                   if p.is_file() and p != self.stage / STAGING_MARK}
        manifest = {
            "study": self.study,
            "argv": self.argv,
            "config": self.config,
            "git": self._git(),
            "packages": package_versions(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "machine": machine_identity(),
            # the package's switches (QERROR_FUSED, QERROR_LAYOUT, ...) and QERROR_DATA:
            # some change a result's last bits, so a run says which it ran with
            "qerror_environment": {k: os.environ[k] for k in sorted(os.environ)
                                   if k.startswith("QERROR_")},
            # Which INT8 kernel FBGEMM runs here decides which simulation is exact; oneDNN's
            # (PT2E's compiled INT8, the x86 engine's convolutions) may differ under a cap
            # such as ONEDNN_MAX_CPU_ISA=AVX2, which saturates oneDNN's pair sums alone.
            "cpu": kernel_probe(),
            "cpu_onednn": kernel_probe(Engine.ONEDNN),
            "started_unix": self.started,
            "seconds": round(time.time() - self.started, 3),
            "outputs": outputs,
            "timing_outputs": sorted(self.timing_outputs),
            **self.extra,
        }
        self.write_json(MANIFEST, manifest)
        self._check_interrupts()
        another = StudyError(f"another run was written to --out {self.final} while this one "
                             "ran; it is left as it is (a run replaces only what was there "
                             "when it started, with --force)")
        try:
            # The destination may have changed while the study ran.
            if self.final.is_symlink() or (self.final.exists() and not self.final.is_dir()):
                raise StudyError(f"--out {self.final} became a file or a symbolic link while "
                                 "the study ran; it is left as it is")
            if self.final.is_dir():
                _check_replaceable(self.final, self.study, force=True)
                if any(self.final.iterdir()) and not self.replaces:
                    raise another
        except (OSError, StudyError) as err:
            self._keep_unplaced(err, None)

        def check(old: Path) -> None:
            # moved aside first, then checked: no other run can be published over it
            # between the check and the move (another --force run)
            if any(old.iterdir()) and _manifest_sha(old) != self.replaced:
                raise another

        # a Ctrl-C between the two renames would leave neither run at --out: it waits for
        # both, and for the rescue of a run that cannot be placed (publish_folder)
        return publish_folder(self.stage, self.final, check=check, rescue=self._keep_unplaced)

    def _check_interrupts(self) -> None:
        if interrupts() != self.interrupts:
            raise KeyboardInterrupt

    def _keep_unplaced(self, err: Exception, old: Path | None) -> None:
        """The run is complete but cannot go to ``--out``: keep it under a name no later run
        removes (or, failing that, where it is) and raise a StudyError that says where it is,
        and where the previous run is when it could not be put back at ``--out`` (``old``;
        None: it is there)."""
        # a run, kept: never removed as left behind
        with contextlib.suppress(OSError):
            (self.stage / STAGING_MARK).unlink(missing_ok=True)
        kept = _beside(self.final, "finished")
        try:
            self.stage.rename(kept)
            where = f"it is complete at {kept}: move it where you want it"
        except OSError:
            kept = self.stage
            where = (f"it is complete at {kept} (under its staging folder's name, which no "
                     "later run removes): move it where you want it")
        self.stage, self.kept = kept, True
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        back = "" if old is None else (f"; the previous run at --out was moved to {old} and "
                                       "could not be put back")
        raise StudyError(f"the run finished but could not be moved to --out {self.final} "
                         f"({reason}); {where}{back}") from err

    def abandon(self) -> None:
        """Remove the staging folder (not a finished run :meth:`finish` had to keep, nor a
        folder made at its place after it was removed)."""
        if not self.kept and self._own_stage():
            shutil.rmtree(self.stage, ignore_errors=True)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        # A failed or interrupted run leaves nothing behind that could pass for a result.
        if exc_type is not None:
            self.abandon()
        return False


#: The paper's text width in inches (A4 less 2.3 cm margins): a figure drawn at this width
#: prints its text at the sizes it sets; a wider one shrinks it in proportion.
PRINT_WIDTH = 6.3


def row_width(panels: int, per_panel: float, share: float = 1.0) -> float:
    """Width in inches of a figure of ``panels`` panels side by side, ``per_panel`` each, at
    most 1.15 times the width it prints at (``share`` of :data:`PRINT_WIDTH`): however many
    panels a run draws, its text prints at no less than 1/1.15 (0.87) of the size it is set at."""
    return min(panels * per_panel, 1.15 * share * PRINT_WIDTH)


def figure_style():
    """Matplotlib with the non-interactive backend and one house style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "pdf.fonttype": 42})
    return plt


def labelled_batches(x: torch.Tensor, y: torch.Tensor, batch: int
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of ``batch`` images, in order (the last one shorter)."""
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def calibration_batches(x: torch.Tensor, y: torch.Tensor, batch: int
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`labelled_batches`, a last batch of one image joined to the one before it:
    BatchNorm statistics, estimated or re-estimated, need two images a batch."""
    cut = labelled_batches(x, y, batch)
    if len(cut) > 1 and len(cut[-1][1]) == 1:
        (xa, ya), (xb, yb) = cut[-2], cut[-1]
        cut[-2:] = [(torch.cat([xa, xb]), torch.cat([ya, yb]))]
    return cut
