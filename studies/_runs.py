"""Reading a finished study run's outputs back, for another study that builds on them.

:func:`early_exit_run` gives the network, exit rule and headline operating point of a
``python -m studies.early_exit`` run: ``studies.bench`` times that network,
``studies.compression`` prices it in bytes beside the other ways of shrinking the model.
A folder without a finished run gives None (the caller says what it does without one); a
run whose files are not the ones its manifest lists, or whose saved exit model does not fit
its network, is an error, never read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pandas.api.types import is_bool_dtype, is_integer_dtype, is_numeric_dtype
from torch import nn

from qerror.files import sha256_file
from qerror.nn.early_exit import EarlyExitResNet, ExitRule
from qerror.nn.models import load_checkpoint
from studies._common import StudyError, previous_run

__all__ = ["EarlyExitRun", "early_exit_run"]

EARLY_EXIT_FILES = ("summary.json", "exit_model.pt")

#: What an early-exit run's manifest config is read for: the network's exits, the bench's label.
EARLY_EXIT_CONFIG = ("arch", "exit_points")

#: What a run's manifest identifies and is read for where present (its network, its data).
EARLY_EXIT_IDENTITY = ("model", "data")

#: The columns read of ``latency.csv`` (studies.compression's early-exit latency rows).
EARLY_EXIT_LATENCY_COLUMNS = ("name", "candidate", "baseline", "note", "pairs", "candidate_ms",
                              "baseline_ms", "ratio_median")

#: The columns of ``latency.csv`` read as numbers, and the dtype each must have.
EARLY_EXIT_LATENCY_NUMBERS = {"pairs": is_integer_dtype, "candidate_ms": is_numeric_dtype,
                              "baseline_ms": is_numeric_dtype, "ratio_median": is_numeric_dtype}

#: The advice for a run's file that is its own (listed) but not what this version's
#: studies.early_exit writes (an older version's run, another writer).
RERUN = "rerun python -m studies.early_exit --force (or point at another run)"


@dataclass(frozen=True)
class EarlyExitRun:
    """A finished early-exit run.

    Attributes
    ----------
    folder : Path
    manifest, summary : dict
        Its ``manifest.json`` and ``summary.json``.
    rule : ExitRule
        The INT8 headline rule (policy, per-exit thresholds, temperatures).
    headline : dict
        The INT8 early-exit operating point of that rule as the run measured it on its test
        images with real INT8 kernels (``accuracy``, ``images``, ``macs_fraction``, ...).
    """

    folder: Path
    manifest: dict
    summary: dict
    rule: ExitRule
    headline: dict

    @property
    def smoke(self) -> bool:
        return bool(self.summary.get("smoke"))

    def latency(self) -> pd.DataFrame | None:
        """The run's latency rows (``latency.csv``: batch-1 latency and batch throughput of
        FP32 eager full, INT8 full and INT8 early exit); None when the run measured none
        (INT8 not compiled).

        Raises
        ------
        StudyError
            When the file is not the one the manifest lists, is not a CSV table, lacks a
            column that is read (:data:`EARLY_EXIT_LATENCY_COLUMNS`) or holds one that is
            read as a number as something else (:data:`EARLY_EXIT_LATENCY_NUMBERS`).
        """
        if "latency.csv" not in self.manifest["outputs"]:
            return None
        _check_listed(self.folder, self.manifest, "latency.csv")
        path = self.folder / "latency.csv"
        try:
            rows = pd.read_csv(path)
        except ValueError as err:  # empty, not text, not CSV: pandas' errors are ValueErrors
            raise StudyError(f"{path} is not a CSV table of latency rows "
                             f"({type(err).__name__}); {RERUN}") from None
        lacking = [c for c in EARLY_EXIT_LATENCY_COLUMNS if c not in rows]
        if lacking:
            raise StudyError(f"{path} lacks {', '.join(lacking)} (not this version's "
                             f"studies.early_exit); {RERUN}")
        # read as numbers only when studies.compression builds its row, after the work
        wrong = [f"{c} {_first_misfit(rows[c], fits is is_integer_dtype)!r}"
                 for c, fits in EARLY_EXIT_LATENCY_NUMBERS.items()
                 if len(rows) and not (fits(rows[c]) and not is_bool_dtype(rows[c]))]
        if wrong:
            raise StudyError(f"{path} holds {', '.join(wrong)}, not a count of pairs and times "
                             f"and ratios as numbers (not this version's studies.early_exit); "
                             f"{RERUN}")
        return rows

    def backbone(self) -> nn.Module:
        """The baseline the run was measured on: the checkpoint its manifest names, checked
        to be the same bytes (its sha256), not whatever was trained at that path since.

        Raises
        ------
        StudyError
            The run names no checkpoint (an untrained smoke network), or the file is gone
            or another one now.
        CheckpointError
            The file does not verify (:func:`qerror.nn.models.load_checkpoint`).
        """
        return load_checkpoint(self.backbone_path()).model

    def backbone_path(self) -> str:
        """The path of the checkpoint :meth:`backbone` loads, checked (its sha256) without
        loading it: a caller can refuse a run before any other work. Raises as
        :meth:`backbone` does (StudyError)."""
        ident = self.manifest.get("model", {})
        path = ident.get("checkpoint")
        if path is None:
            raise StudyError(f"the early-exit run in {self.folder} names no checkpoint (its "
                             "network was untrained); point at a run on a trained baseline")
        if not Path(path).is_file() or sha256_file(path) != ident.get("sha256"):
            raise StudyError(f"{path}, the baseline the early-exit run in {self.folder} was "
                             "measured on, is gone or another file now (its sha256 differs "
                             "from the run's manifest); rerun python -m studies.early_exit "
                             "--force on it, or point at another run")
        return path

    def network(self, backbone: nn.Module) -> EarlyExitResNet:
        """The run's early-exit network on ``backbone`` (its baseline, which a frozen run
        does not save: :meth:`backbone`): the saved heads, or the whole saved state of a
        jointly fine-tuned run, loaded into an :class:`EarlyExitResNet` in eval mode.

        Raises
        ------
        StudyError
            When the manifest's exit points are not blocks of ``backbone``, or
            ``exit_model.pt`` is not a readable state dict of heads that fit it."""
        exit_points = tuple(self.manifest["config"]["exit_points"])
        try:
            model = EarlyExitResNet(backbone, exit_points)
        except ValueError as err:  # exit points another version named
            raise StudyError(f"{self.folder / 'manifest.json'}: its exit points {exit_points} "
                             f"are not this backbone's ({err}); {RERUN}") from None
        path = self.folder / "exit_model.pt"
        try:
            state = torch.load(path, weights_only=True)
        except Exception as err:  # torch raises many types for foreign or damaged files
            raise StudyError(f"{path} is not a readable state dict of exit heads "
                             f"({type(err).__name__}); {RERUN}") from None
        if not isinstance(state, Mapping):
            raise StudyError(f"{path} holds a {type(state).__name__}, not the state dict of "
                             f"exit heads this version's studies.early_exit saves; {RERUN}")
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shapes that differ: another backbone's heads
            lines = str(err).splitlines()
            why = next((s.strip() for s in lines if "size mismatch" in s), lines[0])
            raise StudyError(f"{self.folder / 'exit_model.pt'} does not fit this backbone "
                             f"({why}); pass the run's own baseline") from err
        if unexpected or any(not k.startswith("backbone.") for k in missing):
            raise StudyError(f"{self.folder / 'exit_model.pt'} does not fit the network of "
                             f"{self.folder}: unexpected {sorted(unexpected)[:3]}, missing "
                             f"{sorted(k for k in missing if not k.startswith('backbone.'))[:3]}")
        return model.eval()


def _first_misfit(column: pd.Series, integer: bool):
    """The first entry of a column of another dtype than a number column's (an integer
    column's where ``integer``) that is no such number: what a message shows of it."""
    kinds = (np.integer, int) if integer else (np.number, int, float)
    return next((v for v in column if isinstance(v, bool) or not isinstance(v, kinds)),
                column.iloc[0])


def _check_listed(folder: Path, manifest: dict, name: str) -> None:
    """Refuse a file of a run that is not the one its manifest lists."""
    path = folder / name
    if name not in manifest["outputs"] or not path.is_file() \
            or sha256_file(path) != manifest["outputs"][name]:
        raise StudyError(f"{path} is not the file the manifest of {folder} lists; {RERUN}")


def early_exit_run(folder: Path | str) -> EarlyExitRun | None:
    """The early-exit run in ``folder``; None when the folder holds no finished run of
    ``studies.early_exit``.

    Raises
    ------
    StudyError
        When a file the run is read by is not the one its manifest lists (altered after the
        run, or from another run), or its ``summary.json`` or its manifest lacks what is read
        from it (the INT8 rule, the headline operating point; the architecture, the exit
        points) or holds it as another type (exit points that are not a list of names, a
        ``model`` or ``data`` identity that is not an object).
    """
    folder = Path(folder)
    manifest = previous_run(folder)
    if manifest is None or manifest.get("study") != "early_exit":
        return None
    for name in EARLY_EXIT_FILES:
        _check_listed(folder, manifest, name)
    # what the manifest is read for later (the network, the bench's label): checked here,
    # so that a run of another version is refused before any work, not with a KeyError
    config = manifest.get("config")
    lacking = [k for k in EARLY_EXIT_CONFIG if not isinstance(config, dict) or k not in config]
    if lacking:
        raise StudyError(f"{folder / 'manifest.json'} is not a manifest of this version's "
                         f"studies.early_exit (its config has no {', '.join(lacking)}); {RERUN}")
    # ... and of the types it is read as: another writer's raised a traceback where read
    points = config["exit_points"]
    wrong = [f"{key} {manifest[key]!r} (not an object)" for key in EARLY_EXIT_IDENTITY
             if not isinstance(manifest.get(key, {}), dict)]
    if not isinstance(points, list) or not all(isinstance(p, str) for p in points):
        wrong.append(f"config's exit_points {points!r} (not a list of block names)")
    if wrong:
        raise StudyError(f"{folder / 'manifest.json'} is not a manifest of this version's "
                         f"studies.early_exit: its {', '.join(wrong)}; {RERUN}")
    try:
        summary = json.loads((folder / "summary.json").read_text())
        r = summary["int8_rule"]
        rule = ExitRule(r["policy"], tuple(r["thresholds"]), tuple(r["temperatures"]))
        headline = next(p for p in summary["operating_points"]
                        if p["system"] == "int8_early_exit"
                        and p["policy"] == summary["head_policy"])
    except (ValueError, KeyError, TypeError, StopIteration) as err:
        # the files are the run's own (listed), but not what this version's early_exit
        # writes (an older version's run, another writer): refused with why, not a traceback
        why = "no INT8 early-exit operating point of its head policy" \
            if isinstance(err, StopIteration) else f"{type(err).__name__}: {err}"
        raise StudyError(f"{folder / 'summary.json'} is not a summary of this version's "
                         f"studies.early_exit ({why}); {RERUN}") from None
    return EarlyExitRun(folder, manifest, summary, rule, headline)
