"""Shared plumbing of the studies: run folders, manifests, atomic writes, figures, LaTeX.

A study writes everything into a :class:`RunDir`. Files go to a hidden staging folder
next to the destination; :meth:`RunDir.finish` writes ``manifest.json`` (argv, config,
seed, git commit, package versions, the CPU's FBGEMM kernel probe, data and model
identity, sha256 of every output)
and only then moves the folder into place. An interrupted run leaves a ``.partial``
folder and never a folder that looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qerror.cpu import flush_denormal
from qerror.files import jsonable, package_versions, sha256_file
from qerror.nn.int8 import kernel_probe
from studies._latex import macro_name

REPO = Path(__file__).resolve().parent.parent


def base_parser(study: str, description: str) -> argparse.ArgumentParser:
    """The arguments every study takes: --out, --seed, --smoke."""
    parser = argparse.ArgumentParser(prog=f"python -m studies.{study}", description=description)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / study,
                        help=f"output folder (default: runs/{study} under the repository)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny preset for the test suite: same code path, small sizes")
    return parser


def study_main(body: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """A study's ``main(argv=None) -> int`` from its body.

    ``main`` reads ``sys.argv[1:]`` when ``argv`` is None and runs ``body(argv)`` with
    denormals flushed to zero (:func:`qerror.cpu.flush_denormal`), restoring the caller's
    setting afterwards: long CPU work slows down several times at random without it, and a
    study run in-process (a test, a notebook) must not leave the process changed.
    """

    def main(argv: list[str] | None = None) -> int:
        """Run the study (see the module docstring); ``--help`` lists the arguments."""
        with flush_denormal():
            return body(sys.argv[1:] if argv is None else list(argv))

    return main


def paired_ratio(candidate: Callable[[], object], baseline: Callable[[], object],
                 pairs: int, warmup: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Times of candidate and baseline run alternately, and their per-pair ratios."""
    for _ in range(warmup):
        candidate()
        baseline()
    ta, tb = np.empty(pairs), np.empty(pairs)
    for i in range(pairs):
        t0 = time.perf_counter()
        candidate()
        t1 = time.perf_counter()
        baseline()
        t2 = time.perf_counter()
        ta[i], tb[i] = t1 - t0, t2 - t1
    return ta / tb, ta, tb


def git_identity() -> dict[str, Any]:
    """Commit and whether the work tree differs from it (None outside a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, check=True,
                               timeout=10).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


class RunDir:
    """A study's output folder, staged and published atomically.

    Parameters
    ----------
    out : Path
        Final destination. An existing complete run there is replaced only when
        the new one finishes.
    study : str
        Study name, recorded in the manifest.
    argv : list of str
        The command-line arguments, recorded verbatim.
    config : dict
        Resolved configuration (dataclasses and enums are serialised).
    """

    def __init__(self, out: Path, study: str, argv: list[str], config: dict[str, Any]):
        self.final = Path(out).resolve()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.stage = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"
        if self.stage.exists():
            shutil.rmtree(self.stage)
        self.stage.mkdir()
        self.study = study
        self.argv = list(argv)
        self.config = config
        self.extra: dict[str, Any] = {}
        self.started = time.time()

    def path(self, name: str) -> Path:
        p = self.stage / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_text(self, name: str, text: str) -> Path:
        p = self.path(name)
        p.write_text(text)
        return p

    def write_json(self, name: str, obj) -> Path:
        return self.write_text(name, json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")

    def write_csv(self, name: str, frame) -> Path:
        p = self.path(name)
        frame.to_csv(p, index=False)
        return p

    def write_latex_table(self, name: str, frame, caption: str, label: str,
                          float_format: str = "%.4g") -> Path:
        """A booktabs table (needs ``\\usepackage{booktabs}``)."""
        body = frame.to_latex(index=False, float_format=float_format.__mod__, escape=True)
        text = ("\\begin{table}[t]\n\\centering\n\\small\n" + body
                + f"\\caption{{{caption}}}\n\\label{{{label}}}\n\\end{{table}}\n")
        return self.write_text(name, text)

    def write_macros(self, name: str, macros: dict[str, str]) -> Path:
        """``\\newcommand`` definitions, so the paper's text never holds a typed number.

        Each key is prefixed with the study's name (:func:`studies._latex.macro_name`).
        """
        lines = [f"% generated by python -m studies.{self.study}; do not edit"]
        for key, value in sorted(macros.items()):
            lines.append(f"\\newcommand{{\\{macro_name(self.study, key)}}}{{{value}}}")
        return self.write_text(name, "\n".join(lines) + "\n")

    def save_figure(self, fig, stem: str) -> list[Path]:
        """PDF for LaTeX and PNG for a quick look."""
        paths = []
        for ext, kwargs in (("pdf", {}), ("png", {"dpi": 150})):
            p = self.path(f"{stem}.{ext}")
            fig.savefig(p, bbox_inches="tight", **kwargs)
            paths.append(p)
        return paths

    def finish(self) -> Path:
        """Write the manifest and move the staged folder to its destination."""
        outputs = {str(p.relative_to(self.stage)): sha256_file(p)
                   for p in sorted(self.stage.rglob("*")) if p.is_file()}
        manifest = {
            "study": self.study,
            "argv": self.argv,
            "config": self.config,
            "git": git_identity(),
            "packages": package_versions(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "machine": {"cpus": os.cpu_count()},
            # Which INT8 kernel FBGEMM runs here decides which simulation is exact.
            "cpu": kernel_probe(),
            "started_unix": self.started,
            "seconds": round(time.time() - self.started, 3),
            "outputs": outputs,
            **self.extra,
        }
        self.write_json("manifest.json", manifest)
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            self.final.rename(old)
        self.stage.rename(self.final)
        if old is not None:
            shutil.rmtree(old)
        return self.final

    def abandon(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        # A failed or interrupted run leaves nothing behind that could pass for a result.
        if exc_type is not None:
            self.abandon()
        return False


def figure_style():
    """Matplotlib with the non-interactive backend and one house style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "pdf.fonttype": 42})
    return plt
