"""Train the Fashion-MNIST baseline ResNets that the quantization studies start from.

The recipe is made for the 45-minute training budget on the slowest machine of this project's
kind (2 cores; the README's baseline-train-avx2 record is a measured run there): torchvision's
ResNet with the ImageNet stem (:data:`qerror.nn.models.DEFAULT_STEM`), SGD with Nesterov
momentum on a one-cycle learning rate, label smoothing, a small random shift and horizontal
flips, channels-last tensors. ``--epochs`` defaults per architecture (:data:`DEFAULT_EPOCHS`)
so that epochs × steps per epoch × seconds per step fits the budget; the run times its first
steps and prints how long the rest will take, and a progress bar shows the ETA.

The run is resumable. Every ``--checkpoint-every`` steps and at each epoch's end the model,
optimizer, scheduler, step counter and history go to a state file next to the checkpoint.
Every random choice (initialisation, batch order, augmentation) is a function of the seed,
the epoch and the step, so a resumed run continues exactly as an uninterrupted one would, bit
for bit where it resumes in the same environment (torch threads and version, device, CPU
kernels, ranks; a resume elsewhere goes on with a warning). Rerunning the same command
resumes; ``--no-resume`` starts over.

The validation split is evaluated after every epoch; nothing is chosen on the test split,
whose accuracy (with a Wilson interval) is computed once, at the end. The trained model goes
into the checkpoint cache (:func:`qerror.nn.models.save_checkpoint`) and the run folder gets
``epochs.csv``, ``steps.csv``, ``summary.json``, ``training_curve.{pdf,png}`` and the manifest.
What a rerun measures otherwise is in ``step_seconds.csv`` and ``timing.json``:
``train_seconds`` (the wall time of all sessions, steps and validations, rank 0's clock; what
``--time-budget-min`` counts), ``cumulative_seconds_at_epoch_end`` (``train_seconds`` as it
stood after each epoch's validation), ``validation_seconds`` (each validation's),
``median_step_seconds``, ``torch_threads`` (the last session's) and ``session_environments``
(each session's torch threads and version, device, CPU capability and ranks; also in the
manifest, as ``training_sessions``).

A loss that becomes NaN or infinite stops the run at that step; no checkpoint is written.
Ctrl-C (SIGINT) saves the state at the last completed step, so the same command continues.

The loop is the library's (:func:`qerror.nn.training.fit`). ``--device cuda`` trains on a GPU;
under ``torchrun`` the run is data-parallel (DistributedDataParallel, gloo on CPUs, NCCL on
GPUs): each rank computes its share of every ``--batch-size`` batch, and rank 0 alone writes
the state, the checkpoint and the run folder, e.g.
``torchrun --standalone --nproc-per-node 4 -m studies.train --device cuda``.

Run: ``python -m studies.train --arch resnet50`` (and ``--arch resnet18``); ``--smoke`` for a
tiny end-to-end run. Exit status 0: trained; 2: bad arguments, no data or bad data, a state
file from a different recipe, or a diverged loss; 3: stopped early (``--stop-after-steps`` or
``--time-budget-min``, which counts the training time of all sessions) with the state saved,
so the same command without that limit continues; 130: interrupted (Ctrl-C), the state
saved, so the same command continues.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from qerror import data, wilson_ci
from qerror.files import jsonable, name_bytes, name_room
from qerror.nn import parallel
from qerror.nn.models import (
    DEFAULT_STEM,
    Arch,
    Checkpoint,
    CheckpointError,
    Stem,
    default_checkpoint_path,
    fashion_resnet,
    get_baseline,
    has_checkpoint_sidecar,
    save_checkpoint,
    sidecar_path,
)
from qerror.nn.training import (
    Batch,
    Device,
    DivergedError,
    Evaluation,
    FitResult,
    Placement,
    ResumeError,
    Schedule,
    TrainConfig,
    TrainError,
    distributed,
    fit,
)
from studies._common import (
    DATA_ROOT_HELP,
    REPO,
    PublishedInterrupt,
    RunDir,
    StudyError,
    base_parser,
    check_out,
    check_writable_parent,
    figure_style,
    out_name_room,
    positive_float,
    positive_int,
    previous_run,
    study_main,
    user_path,
)

# Epochs that fit the 45-minute training budget on the slowest machine of this kind (2 cores)
# at the step times of the default stem (measure them with
# qerror.nn.models.time_training_step; the README's baseline-train-avx2 record is a run there).
DEFAULT_EPOCHS = {Arch.RESNET50: 3, Arch.RESNET18: 5}
EXIT_INCOMPLETE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


TEST_ALPHA = 0.05  # the test accuracy's Wilson interval has confidence 1 - TEST_ALPHA


class _CheckpointWritten(KeyboardInterrupt):
    """A Ctrl-C after the trained checkpoint was written and before its run was published."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights; a state file resumes only under the
    recipe that wrote it.

    ``lr`` is the peak of the one-cycle schedule, reached after ``warmup_fraction`` of the
    steps. ``train_images`` and ``test_images`` (None: all) shrink the data for smoke runs;
    ``val_split`` and ``calib_split`` are the sizes of the held-out parts of the training
    file (:func:`qerror.data.fashion_mnist_splits`, split seed 0 like every study).
    """

    arch: Arch
    stem: Stem
    epochs: int
    batch_size: int
    lr: float
    seed: int = 0
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.25
    crop_pad: int = 2
    flip: bool = True
    val_split: int = data.VAL_IMAGES
    calib_split: int = data.CALIB_IMAGES
    train_images: int | None = None
    test_images: int | None = None
    eval_batch_size: int = 500

    def train_config(self) -> TrainConfig:
        """The optimisation part of the recipe, for :func:`qerror.nn.training.fit`."""
        return TrainConfig(self.epochs, self.batch_size, self.lr, seed=self.seed,
                           momentum=self.momentum, nesterov=True,
                           weight_decay=self.weight_decay,
                           label_smoothing=self.label_smoothing, schedule=Schedule.ONE_CYCLE,
                           warmup_fraction=self.warmup_fraction, channels_last=True)


def default_recipe(arch: Arch, stem: Stem, *, smoke: bool = False, seed: int = 0) -> Recipe:
    """The default recipe, or the smoke preset: same code path, a few hundred images."""
    if smoke:
        return Recipe(arch, stem, epochs=2, batch_size=32, lr=0.05, seed=seed, val_split=64,
                      calib_split=32, train_images=256, test_images=256, eval_batch_size=128)
    return Recipe(arch, stem, epochs=DEFAULT_EPOCHS[arch], batch_size=128, lr=0.1, seed=seed)


def batch_tensors(images: np.ndarray, labels: np.ndarray, *, crop_pad: int = 0,
                  flip: bool = False, generator: torch.Generator | None = None,
                  rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 28, 28) images → channels-last (N, 1, 32, 32) input, optionally augmented.

    The random shift pads with the background value of :func:`qerror.data.to_tensor` (a
    zero pixel after normalisation), so a shifted image looks like an unshifted one with
    the object moved by up to ``crop_pad`` pixels in each direction. ``rows`` (a rank's
    share of a global batch) keeps only those images, shape (len(rows), 1, 32, 32), after
    drawing the random numbers of all N: an image is augmented the same way on any number
    of ranks.
    """
    n = len(images)
    rows = slice(0, n) if rows is None else rows
    x = data.to_tensor(images[rows])
    m = x.shape[0]
    if crop_pad:
        background = -data.MEAN / data.STD
        padded = nn.functional.pad(x, (crop_pad,) * 4, value=background)
        off = torch.randint(0, 2 * crop_pad + 1, (2, n), generator=generator)[:, rows]
        r = (off[0, :, None] + torch.arange(32))[:, :, None]
        c = (off[1, :, None] + torch.arange(32))[:, None, :]
        x = padded[torch.arange(m)[:, None, None], 0, r, c].unsqueeze(1)
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5)[rows]
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    y = torch.from_numpy(np.ascontiguousarray(labels[rows])).long()
    return x.contiguous(memory_format=torch.channels_last), y


@torch.inference_mode()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> tuple[float, int]:
    """Mean cross-entropy and the number of correct top-1 predictions (evaluation mode, on
    the model's device)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss, correct = 0.0, 0
    for lo in range(0, len(labels), batch_size):
        x, y = batch_tensors(images[lo:lo + batch_size], labels[lo:lo + batch_size])
        out = model(x.to(device))
        y = y.to(device)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train(was_training)
    return loss / len(labels), correct


def load_splits(args, recipe: Recipe, place: Placement) -> data.Splits:
    """The recipe's Fashion-MNIST splits, downloaded first if ``--download`` asks and they
    are missing.

    Under torchrun one process per machine (local rank 0) looks and downloads while the
    others wait; then every rank reads the files. Ranks downloading at once would write the
    same files together, and one rank's failure would delete the folder another is filling.
    A failed download stops every rank with its message."""
    def splits(download: bool) -> data.Splits:
        return data.fashion_mnist_splits(args.data_root, val=recipe.val_split,
                                         calib=recipe.calib_split, download=download)

    if not args.download or place.world_size == 1:
        return splits(args.download)
    got, failure = None, None
    if place.local_rank == 0:
        try:
            got = splits(True)
        except (data.DataNotFoundError, data.DataError) as exc:
            failure = exc
    # every rank waits here for the downloads: all stop, or all read
    failures = [f for f in parallel.gather_objects(failure) if f is not None]
    if failures:
        raise failures[0]
    return got if got is not None else splits(False)


def train_recipe(recipe: Recipe, splits: data.Splits, state_path: Path, *,
                 device: Device | str = Device.CPU, resume: bool = True,
                 checkpoint_every: int = 100, stop_after_steps: int | None = None,
                 time_budget_s: float | None = None, progress: bool = True) -> FitResult:
    """Train (or continue training) ``recipe`` on ``splits.train`` with the library's loop
    (:func:`qerror.nn.training.fit`), validating each epoch on ``splits.val``.

    ``test`` is not touched. Under torchrun each rank computes its share of every batch and
    rank 0 writes the state; the other arguments are :func:`~qerror.nn.training.fit`'s.

    Raises
    ------
    TrainError
        Too few training images for one batch (and :func:`~qerror.nn.training.fit`'s
        errors: ResumeError, DivergedError, DeviceError).
    """
    train = splits.train
    if recipe.train_images is not None:
        if recipe.train_images > len(train):
            raise TrainError(f"train_images={recipe.train_images} but the training split "
                             f"holds {len(train)} images")
        train = train.subset(np.arange(recipe.train_images))
    val = splits.val

    def batch(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_tensors(train.images[b.indices], train.labels[b.indices],
                             crop_pad=recipe.crop_pad, flip=recipe.flip, generator=b.generator,
                             rows=b.shard)

    def validate(model: nn.Module) -> Evaluation:
        loss, correct = evaluate(model, val.images, val.labels, recipe.eval_batch_size)
        return Evaluation(loss, correct, len(val))

    config = recipe.train_config()
    identity = {k: v for k, v in jsonable(recipe).items() if k not in jsonable(config)}
    # the images themselves: a state resumes only on the data it was trained on
    identity["data"] = {"train_sha256": train.sha256, "val_sha256": val.sha256}
    model = fashion_resnet(recipe.arch, recipe.stem, seed=recipe.seed)
    return fit(model, batch, len(train), config, state_path=state_path, resume=resume,
               val=validate, val_size=len(val), identity=identity, device=device,
               checkpoint_every=checkpoint_every, stop_after_steps=stop_after_steps,
               time_budget_s=time_budget_s, progress=progress,
               desc=f"{recipe.arch.value} train", return_interrupted=True)


def _figure(run: RunDir, steps: pd.DataFrame, epochs: pd.DataFrame, per_epoch: int,
            test_acc: float, test_ci: tuple[float, float], title: str) -> None:
    plt = figure_style()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(7.0, 2.6))
    x = steps["step"] / per_epoch
    ax_loss.plot(x, steps["loss"], lw=0.5, alpha=0.4, label="per step")
    window = max(1, per_epoch // 10)
    ax_loss.plot(x, steps["loss"].rolling(window, min_periods=1).mean(), lw=1.2,
                 label=f"mean of {window}")
    ax_loss.set(xlabel="epoch", ylabel="training loss (label-smoothed CE)")
    ax_loss.legend(frameon=False)
    ax_acc.plot(epochs["epoch"], epochs["val_accuracy"], marker="o", label="validation")
    ax_acc.fill_between(epochs["epoch"], epochs["val_ci_low"], epochs["val_ci_high"], alpha=0.25)
    last = epochs["epoch"].iloc[-1]
    ax_acc.errorbar([last], [test_acc], yerr=[[test_acc - test_ci[0]], [test_ci[1] - test_acc]],
                    fmt="s", capsize=3, label="test (once, at the end)")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (95% Wilson CI)")
    ax_acc.legend(frameon=False)
    fig.suptitle(title)
    run.save_figure(fig, "training_curve")
    plt.close(fig)


def _budget_minutes(text: str) -> float:
    """--time-budget-min: finite and above 0, in seconds too (the loop counts seconds);
    "no limit" is said by leaving it out."""
    try:
        minutes = positive_float(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err} (leave it out for no limit)") from None
    if not math.isfinite(minutes * 60):
        raise argparse.ArgumentTypeError(
            f"must be at most {sys.float_info.max / 60:.6g} minutes, whose seconds are a "
            f"finite number, got {text!r} (leave it out for no limit)")
    return minutes


def _checkpoint_file(text: str) -> Path:
    """--checkpoint: a path (``~`` expanded) whose last part names a file. ``.``, ``/`` and
    ``DIR/..`` name a folder: the training state named after the file had no name (a
    traceback), or was made in a folder the path never names (``DIR/...train-state.pt``),
    and the checkpoint was refused only after training."""
    path = user_path(text)
    if path.name in ("", ".."):
        raise argparse.ArgumentTypeError(f"must name a file, e.g. {path / 'model.pt'}, got "
                                         f"{text!r}")
    return path


def build_parser():
    parser = base_parser("train", __doc__.splitlines()[0], force=True,
                         out_default="runs/train/ARCH-STEM, with -smoke for --smoke,",
                         force_also="a qerror checkpoint at --checkpoint (default: the "
                                    "cache's) with the one this run trains")
    parser.add_argument("--arch", type=Arch.parse, default=Arch.RESNET50,
                        help="resnet50 (default) or resnet18")
    parser.add_argument("--stem", type=Stem.parse, default=DEFAULT_STEM,
                        help=f"{', '.join(s.value for s in Stem)} (default {DEFAULT_STEM.value}; "
                             "see qerror.nn.models.Stem)")
    parser.add_argument("--epochs", type=positive_int, help="default: "
                        + ", ".join(f"{a.value} {e}" for a, e in DEFAULT_EPOCHS.items())
                        + "; smoke 2")
    parser.add_argument("--batch-size", type=positive_int, help="default 128 (smoke 32)")
    parser.add_argument("--lr", type=positive_float,
                        help="peak one-cycle learning rate, finite and above 0 (default 0.1, "
                             "smoke 0.05)")
    parser.add_argument("--data-root", type=user_path, help=DATA_ROOT_HELP)
    parser.add_argument("--download", action="store_true",
                        help="download Fashion-MNIST if it is not found")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue an interrupted run from its state file")
    parser.add_argument("--time-budget-min", type=_budget_minutes,
                        help="minutes; stop (state saved) before the training time of all "
                             "sessions together would exceed this")
    parser.add_argument("--stop-after-steps", type=positive_int,
                        help="stop (state saved) once this many steps are done in total")
    parser.add_argument("--checkpoint-every", type=positive_int, default=100,
                        help="steps between state saves (also saved at each epoch's end)")
    parser.add_argument("--checkpoint", type=_checkpoint_file,
                        help="where the trained model goes (default: the cache, "
                             "qerror.nn.models.default_checkpoint_path)")
    parser.add_argument("--device", type=Device.parse, default=Device.CPU,
                        help="cpu (default), cuda or auto (cuda where a GPU is found); under "
                             "torchrun, one GPU per local rank")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")
    return parser


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe = default_recipe(args.arch, args.stem, smoke=args.smoke, seed=args.seed)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                   ("lr", args.lr)) if v is not None}
    recipe = replace(recipe, **overrides)
    tag = f"{recipe.arch.value}-{recipe.stem.value}" + ("-smoke" if args.smoke else "")
    checkpoint = args.checkpoint or default_checkpoint_path(
        recipe.arch, recipe.stem, tag="smoke" if args.smoke else None)
    # the whole file name: x.pt and x.pth are two checkpoints, with two training states
    state_path = _state_path(checkpoint)
    out = args.out or REPO / "runs" / "train" / tag
    try:
        with distributed(args.device) as place:
            # Both destinations are checked before hours of training, not after; rank 0
            # writes, so it checks (and tidies) the output folder.
            refusal = None
            if place.is_main:
                try:
                    check_out(out, "train", force=args.force)
                    _check_targets(checkpoint, out, force=args.force, resume=args.resume,
                                   cache=args.checkpoint is None)
                except StudyError as exc:
                    refusal = str(exc)
            # every rank stops with rank 0's words, not in the collective it would wait in
            # (rank 0 alone looks at the files: ranks need not share a disk)
            refusal = parallel.broadcast_object(refusal)
            if refusal is not None:
                raise StudyError(refusal)
            splits = load_splits(args, recipe, place)
            result = train_recipe(recipe, splits, state_path, device=place.device,
                                  resume=args.resume, checkpoint_every=args.checkpoint_every,
                                  stop_after_steps=args.stop_after_steps,
                                  time_budget_s=None if args.time_budget_min is None
                                  else args.time_budget_min * 60, progress=args.progress)
            if not place.is_main:
                # Rank 0 reports and writes; the others end with its status.
                return (EXIT_INTERRUPTED if result.interrupted else
                        0 if result.complete else EXIT_INCOMPLETE)
            return _report(result, recipe, splits, args, argv, checkpoint, state_path, out,
                           place.world_size)
    except DivergedError as exc:
        print(f"[train] error: {exc} Here: a lower --lr than {recipe.lr:g}, with --no-resume.",
              file=sys.stderr)
        return 2
    except ResumeError as exc:
        print(f"[train] error: {exc} (--no-resume starts over)", file=sys.stderr)
        return 2
    except (data.DataNotFoundError, data.DataError, TrainError) as exc:
        print(f"[train] error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[train] interrupted before training started or resumed; no file was changed.",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def _report(result: FitResult, recipe: Recipe, splits: data.Splits, args, argv: list[str],
            checkpoint: Path, state_path: Path, out: Path, world_size: int) -> int:
    launcher = ["python"] if world_size == 1 else ["torchrun", f"--nproc-per-node={world_size}"]
    # the state is continued by the command without --no-resume (with it, training restarts)
    same, resuming = _resuming(argv)
    command = shlex.join([*launcher, "-m", "studies.train", *resuming]) + (
        "" if world_size == 1 else " (with your other torchrun options)")
    if result.interrupted:
        print(f"[train] interrupted at step {result.step} of {result.total_steps}; the state is "
              f"saved in {state_path}. To continue, run {same}: {command}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if not result.complete:
        if args.stop_after_steps is not None and result.step >= args.stop_after_steps:
            how = "without --stop-after-steps, or with a larger one"
        else:
            how = "with a larger --time-budget-min, or without one"
        print(f"[train] stopped at step {result.step} of {result.total_steps}; the state is in "
              f"{state_path}. To continue, run {same}" + (", and " if resuming != argv else " ")
              + f"{how}.", flush=True)
        return EXIT_INCOMPLETE
    try:
        return _write_results(recipe, splits, result, checkpoint, state_path, out, argv,
                              args.smoke, world_size, force=args.force)
    except PublishedInterrupt as exc:
        print(f"[train] interrupted after the run was published: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _CheckpointWritten:
        # a --force run has replaced the checkpoint that --out's previous run describes
        there = previous_run(Path(out).expanduser())
        held = (f"--out {out} still holds the previous run, which describes the checkpoint "
                "this one replaced" if there is not None and there.get("study") == "train"
                else f"nothing was written to --out {out}")
        print(f"[train] interrupted while writing the run folder: the trained checkpoint is "
              f"written ({checkpoint}) and {held}; the trained state is kept in {state_path}. "
              f"To write the run folder (in seconds), run {same}: {command}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"[train] interrupted while writing the results; the trained state is kept in "
              f"{state_path}. To write them, run {same}: {command}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _state_path(checkpoint: Path) -> Path:
    """Where the resumable training state of ``checkpoint`` is kept: beside it, named after
    its whole file name (``x.pt`` and ``x.pth`` are two checkpoints, with two states)."""
    return checkpoint.with_name(checkpoint.name + ".train-state.pt")


def _check_targets(checkpoint: Path, out: Path | str, *, force: bool, resume: bool = False,
                   cache: bool = False) -> None:
    """StudyError unless the checkpoint may be written where asked (below) outside ``out``.

    Its name must leave room for the files named after it (its sidecar and its training
    state) within the file system's limit. The run folder is staged and published as a
    whole: a checkpoint (and its state) inside it would be written there by training and
    refused after it. ``resume`` (the run resumes a state it finds) acts as ``force`` where
    the checkpoint's training state is kept: a run cut while writing its results has saved
    the checkpoint but kept its state, and rerunning the command finishes it and may replace
    that checkpoint. ``cache``: the checkpoint is the cache's (no ``--checkpoint`` given),
    and the messages say so.
    """
    # the sidecar and the training state are named after the checkpoint, longer: a legal
    # name that leaves no room for them would fail at the first state save, or after
    # training (checked first: a longer name than the file system takes is an OSError
    # wherever it is looked at)
    derived = max((sidecar_path(checkpoint), _state_path(checkpoint)),
                  key=lambda p: name_bytes(p.name))
    longest, room = name_room(checkpoint, [derived.name])
    if name_bytes(checkpoint.name) > room:
        raise StudyError(f"{'the cache' if cache else '--checkpoint'} {checkpoint}: its name "
                         f"is {name_bytes(checkpoint.name)} bytes, and a file named after it "
                         f"is written beside it (NAME{derived.name[len(checkpoint.name):]}, "
                         f"{name_bytes(derived.name)} bytes here), over the {longest} bytes a "
                         f"file name may have there; pass a --checkpoint whose name is at most "
                         f"{room} bytes")
    force = force or (resume and _state_path(checkpoint).is_file())
    inside = Path(out).expanduser().resolve()
    try:
        target = checkpoint.expanduser().resolve()
    except RuntimeError as err:  # a loop of symbolic links (Python < 3.13)
        raise StudyError(f"{'the cache' if cache else '--checkpoint'} {checkpoint}: cannot "
                         f"follow it to a file ({err}); pass a path that is not a loop of "
                         "symbolic links") from err
    if target.is_relative_to(inside):
        raise StudyError(f"--checkpoint {checkpoint} lies inside --out {out}, which holds the "
                         "run's own outputs only (it is staged and replaced as a whole); pass "
                         "a --checkpoint outside it")
    _check_checkpoint_target(checkpoint, force=force, cache=cache)


def _check_checkpoint_target(path: Path, *, force: bool, cache: bool = False) -> None:
    """StudyError unless ``path`` may receive the trained checkpoint.

    A missing file may; a qerror checkpoint (it has its sidecar) may with ``force``; any
    other file is never replaced, nor is a folder. ``cache``: ``path`` is the cache's
    checkpoint, not one the user named with ``--checkpoint``, and the messages say so (and
    how to choose another place).
    """
    what = "the cache's checkpoint" if cache else "--checkpoint"
    elsewhere = (" (or set XDG_CACHE_HOME to another cache folder, an absolute path, or pass "
                 "--checkpoint with a file of your own)" if cache else "")
    if path.is_dir():
        raise StudyError(f"{what} {path} is a folder; it is never replaced: "
                         + ("move it away" if cache else "pass the name of a file, e.g. "
                            f"--checkpoint {path / 'model.pt'}") + elsewhere)
    # Its folder also holds the resumable state, written from the first checkpoint step on.
    check_writable_parent(path, what, why=", where the checkpoint and the training state are "
                          "written", instead="set XDG_CACHE_HOME to a folder you can write in "
                          "(an absolute path), or pass --checkpoint with a file of your own"
                          if cache else None)
    if path.is_symlink():  # the checkpoint goes where the link points (atomic_write)
        check_writable_parent(path.resolve(), f"{what} {path}, a link to",
                              why=", where the checkpoint is written",
                              instead="point the link at a folder you can write in, or "
                              "pass another --checkpoint")
    sidecar = sidecar_path(path)
    if (sidecar.exists() or sidecar.is_symlink()) and not has_checkpoint_sidecar(path):
        raise StudyError(f"{what} {path}: {sidecar}, where its sidecar would be written, "
                         "exists and is not a qerror checkpoint's sidecar; it is never "
                         "replaced, with --force neither. "
                         + ("Move it away" + elsewhere if cache else "Pass the name of a new file"))
    if not path.exists():
        return
    if not has_checkpoint_sidecar(path):
        raise StudyError(f"{what} {path} is an existing file that is not a qerror "
                         f"checkpoint (there is no qerror sidecar {sidecar_path(path).name} "
                         "beside it); it is never replaced, with --force neither. "
                         + ("Move it away" + elsewhere if cache else
                            "Pass the name of a new file"))
    if not force:
        raise StudyError(f"{what} {path} already holds a trained checkpoint; pass --force "
                         "to replace it with the one this run trains, or "
                         + ("--checkpoint with a file of your own" if cache
                            else "another --checkpoint"))


def _write_results(recipe: Recipe, splits: data.Splits, result: FitResult, checkpoint: Path,
                   state_path: Path, out: Path, argv: list[str], smoke: bool,
                   world_size: int, force: bool = False) -> int:
    """Test once, then write the checkpoint, the run folder and its manifest; the state
    file goes last, so an interrupted write is finished by rerunning the command."""
    test = splits.test if recipe.test_images is None else \
        splits.test.subset(np.arange(min(recipe.test_images, len(splits.test))))
    test_loss, correct = evaluate(result.model, test.images, test.labels, recipe.eval_batch_size)
    test_ci = wilson_ci(correct, len(test), TEST_ALPHA)
    history = result.history
    steps = pd.DataFrame([asdict(r) for r in history.steps])
    epochs = pd.DataFrame([asdict(r) for r in history.epochs])
    step_s = float(steps["seconds"].median())
    metrics = {"test_accuracy": correct / len(test), "test_ci": list(test_ci.ci),
               "test_ci_alpha": TEST_ALPHA,  # the interval's level, for whoever quotes it
               "test_n": len(test), "test_loss": test_loss,
               "val_accuracy": float(epochs["val_accuracy"].iloc[-1]),
               "val_n": len(splits.val), "train_seconds": history.train_seconds,
               "median_step_seconds": step_s, "steps": result.step,
               "sessions": history.sessions, "world_size": world_size,
               "torch_threads": torch.get_num_threads(),
               "session_environments": history.environments}
    data_identity = {"source": splits.train.source, "train_sha256": splits.train.sha256,
                     "val_sha256": splits.val.sha256, "test_sha256": test.sha256}
    info = save_checkpoint(result.model, checkpoint, arch=recipe.arch, stem=recipe.stem,
                           config={"recipe": recipe, "data": data_identity}, metrics=metrics)
    config = {"recipe": jsonable(recipe), "checkpoint": str(checkpoint),
              "state": str(state_path), "smoke": smoke, "world_size": world_size,
              "device": str(next(result.model.parameters()).device.type)}
    timing_keys = ("train_seconds", "median_step_seconds", "torch_threads",
                   "session_environments")
    # made after training: --force decides again whether a run now at --out is replaced
    try:
        with RunDir(out, "train", argv, config, force=force) as run:
            # Measured times go to files of their own, named in the manifest, so a rerun of the
            # same command writes the other outputs byte for byte. The checkpoint's sha256 is
            # in the manifest: the checkpoint records when it was made and how long it took.
            run.write_csv("epochs.csv", epochs.drop(columns="train_seconds"))
            run.write_csv("steps.csv", steps.drop(columns="seconds"))
            run.write_csv("step_seconds.csv", steps[["step", "seconds"]], timing=True)
            run.write_json("timing.json",
                           {**{k: metrics[k] for k in timing_keys},
                            "cumulative_seconds_at_epoch_end":
                                epochs["train_seconds"].tolist(),
                            "validation_seconds": history.val_seconds},
                           timing=True)
            run.write_json("summary.json", {"recipe": recipe, "checkpoint": str(checkpoint),
                                            **{k: v for k, v in metrics.items()
                                               if k not in timing_keys}})
            _figure(run, steps, epochs, result.total_steps // recipe.epochs,
                    metrics["test_accuracy"], test_ci.ci,
                    f"{recipe.arch.value}, {recipe.stem.value} stem, Fashion-MNIST")
            run.extra = {"model": {"arch": recipe.arch.value, "stem": recipe.stem.value,
                                   "checkpoint": str(checkpoint), "sha256": info.sha256},
                         "data": data_identity,
                         # every session's, which decide the weights' last bits with the seed
                         "training_sessions": history.environments}
            try:
                final = run.finish()
            except PublishedInterrupt:
                # the run is at --out, complete: the state has nothing left to finish
                state_path.unlink(missing_ok=True)
                raise
    except StudyError as exc:  # the work is not lost: say so, and how to finish it
        raise StudyError(f"{exc}. The trained checkpoint is written ({checkpoint}) and the "
                         f"training state kept ({state_path}): {_resuming(argv)[0]} with a "
                         "free --out finishes the run in seconds") from exc
    except PublishedInterrupt:
        raise
    except KeyboardInterrupt:
        raise _CheckpointWritten from None
    try:
        state_path.unlink(missing_ok=True)
        print(f"[train] {recipe.arch.value}/{recipe.stem.value}: test accuracy "
              f"{metrics['test_accuracy']:.4f} [{test_ci.ci[0]:.4f}, {test_ci.ci[1]:.4f}] "
              f"(n={len(test)}) after {history.train_seconds / 60:.1f} min of training; "
              f"checkpoint {checkpoint}; run {final}")
    except KeyboardInterrupt:  # the run is published: nothing is left to finish
        state_path.unlink(missing_ok=True)
        raise PublishedInterrupt(f"it is complete at {final}") from None
    return 0


def get_or_train_baseline(arch: Arch | str = Arch.RESNET50, stem: Stem | str = DEFAULT_STEM,
                          *, train_if_missing: bool, path: Path | str | None = None,
                          data_root: Path | str | None = None, download: bool = False,
                          train_args: tuple[str, ...] = ()) -> Checkpoint:
    """The cached baseline (:func:`qerror.nn.models.get_baseline`), trained here first if absent.

    With no checkpoint and ``train_if_missing``, this study runs (it times its first steps
    and prints how long the rest will take, shows a progress bar, and resumes an interrupted
    run); otherwise the library's :class:`~qerror.nn.models.CheckpointNotFoundError`, whose
    message gives the command, is raised. ``data_root``, ``download`` and ``train_args`` are
    passed to the training run.

    Raises
    ------
    CheckpointError
        Also when training stopped before the end (a time budget or a step limit); the
        message says how to resume. And, before training, when ``path``'s name leaves no
        room for the run folder named after it (``NAME.run``, staged under a longer name)
        within the file system's limit: the message gives the longest name that works.
    KeyboardInterrupt
        The training was interrupted (Ctrl-C): its state is saved, and the printed command
        resumes it.
    """
    arch, stem = Arch.parse(arch), Stem.parse(stem)
    path = Path(path) if path is not None else default_checkpoint_path(arch, stem)
    if not path.exists() and train_if_missing:
        # The run's folder lies beside the checkpoint, not at the trainer's default --out,
        # where a user's own training run would be replaced: --force replaces only an
        # earlier run of this baseline there (the checkpoint itself is missing).
        out = path.with_name(path.name + ".run")
        # the training run would refuse this --out, an option the caller never gave: the
        # checkpoint's name is refused here (the run's names add more to it than the
        # checkpoint's own sidecar and training state do, so that room is the checkpoint's)
        longest, room = out_name_room(out)
        if name_bytes(out.name) > room:
            added = name_bytes(out.name) - name_bytes(path.name)
            raise CheckpointError(
                f"checkpoint {path}: its name is {name_bytes(path.name)} bytes, and the run "
                f"that trains it is written beside it as NAME.run, staged under a longer name "
                f"(.NAME.run.partial-PID, {name_bytes(out.name) + longest - room} bytes here), "
                f"over the {longest} bytes a file name may have there; pass a checkpoint path "
                f"whose name is at most {room - added} bytes")
        argv = ["--arch", arch.value, "--stem", stem.value, "--checkpoint", str(path),
                "--out", str(out), "--force"]
        if data_root is not None:
            argv += ["--data-root", str(data_root)]
        if download:
            argv.append("--download")
        argv += list(train_args)
        command = shlex.join(["python", "-m", "studies.train", *argv])
        print(f"[qerror] no {arch.value}/{stem.value} baseline at {path}; training it with "
              f"`{command}`", flush=True)
        code = main(argv)
        if code == EXIT_INTERRUPTED:  # a Ctrl-C, the caller's too: not an error
            same, resuming = _resuming(argv)
            print(f"[qerror] training the {arch.value}/{stem.value} baseline was interrupted; "
                  f"run {same} again to resume it: "
                  f"{shlex.join(['python', '-m', 'studies.train', *resuming])}", file=sys.stderr)
            raise KeyboardInterrupt
        if code == EXIT_INCOMPLETE:
            # the limits count every session: with them, the same command stops at once
            rest = shlex.join(["python", "-m", "studies.train",
                               *_without_limits(_resuming(argv)[1])])
            raise CheckpointError(
                f"training the {arch.value}/{stem.value} baseline stopped early (exit code "
                f"{code}: --stop-after-steps or --time-budget-min), its state saved; to "
                f"continue it, run the command without that limit (or with a larger one): "
                f"{rest}")
        if code != 0:
            raise CheckpointError(
                f"training the {arch.value}/{stem.value} baseline failed with exit code {code} "
                f"for the reason printed above; correct it, then run: {command}")
    return get_baseline(arch, stem, path=path)


def _without(argv: list[str], drop: dict[str, bool]) -> list[str]:
    """``argv`` without the options ``drop`` names (``{option: whether it takes a value}``)
    and their values (also as ``--option=value`` or abbreviated as argparse takes them)."""
    # argparse lists a parser's option strings in no public attribute
    options = [o for o in build_parser()._option_string_actions if o.startswith("--")]
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        named = [o for o in options if o == name] or [o for o in options if o.startswith(name)]
        if arg.startswith("--") and len(named) == 1 and named[0] in drop:
            skip = drop[named[0]] and "=" not in arg
            continue
        kept.append(arg)
    return kept


def _without_limits(argv: list[str]) -> list[str]:
    """``argv`` without --stop-after-steps and --time-budget-min and their values."""
    return _without(argv, {"--stop-after-steps": True, "--time-budget-min": True})


def _resuming(argv: list[str]) -> tuple[str, list[str]]:
    """The command that continues a run's saved state (``argv`` without --no-resume, with
    which the same command would train from the start) and how to say it: "the same
    command", or "the same command without --no-resume"."""
    kept = _without(argv, {"--no-resume": False})
    return ("the same command" if kept == argv else "the same command without --no-resume",
            kept)


main = study_main(_main)


if __name__ == "__main__":
    raise SystemExit(main())
