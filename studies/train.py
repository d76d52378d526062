"""Train the Fashion-MNIST baseline ResNets that the quantization studies start from.

The recipe is made for a 2-core CPU and a 30-minute budget: torchvision's ResNet with the
ImageNet stem (:data:`qerror.nn.models.DEFAULT_STEM`), SGD with Nesterov momentum on a one-cycle
learning rate, label smoothing, a small random shift and horizontal flips, channels-last
tensors. ``--epochs`` defaults per architecture (:data:`DEFAULT_EPOCHS`) so that epochs ×
steps per epoch × seconds per step fits the budget; the run times its first steps and prints
how long the rest will take, and a progress bar shows the ETA.

The run is resumable. Every ``--checkpoint-every`` steps and at each epoch's end the model,
optimizer, scheduler, step counter and history go to a state file next to the checkpoint.
Every random choice (initialisation, batch order, augmentation) is a function of the seed,
the epoch and the step, so a resumed run continues exactly as an uninterrupted one would.
Rerunning the same command resumes; ``--no-resume`` starts over.

The validation split is evaluated after every epoch; nothing is chosen on the test split,
whose accuracy (with a Wilson interval) is computed once, at the end. The trained model goes
into the checkpoint cache (:func:`qerror.nn.models.save_checkpoint`) and the run folder gets
``epochs.csv``, ``steps.csv``, ``summary.json``, ``training_curve.{pdf,png}`` and the manifest.

A loss that becomes NaN or infinite stops the run at that step; no checkpoint is written.
Ctrl-C (SIGINT) saves the state at the last completed step, so the same command continues.

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
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from qerror import data, wilson_ci
from qerror.files import atomic_write, jsonable
from qerror.nn.models import (
    DEFAULT_STEM,
    Arch,
    Checkpoint,
    CheckpointError,
    Stem,
    default_checkpoint_path,
    fashion_resnet,
    get_baseline,
    non_finite_tensors,
    save_checkpoint,
    sidecar_path,
)
from studies._common import (
    REPO,
    RunDir,
    StudyError,
    base_parser,
    check_out,
    figure_style,
    positive_float,
    positive_int,
    study_main,
)

# Epochs that fit 30 minutes on a 2-core CPU at the step times of the default stem
# (measure them with qerror.nn.models.time_training_step; see qerror.nn.models.DEFAULT_STEM).
DEFAULT_EPOCHS = {Arch.RESNET50: 3, Arch.RESNET18: 5}
EXIT_INCOMPLETE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
STATE_FORMAT = "qerror-train-state"
STATE_VERSION = 1
# Independent random streams derived from the one seed.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1
# Steps timed (after the first, which includes kernel selection) before the estimate.
_ESTIMATE_STEPS = 3


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
    val_split: int = 5000
    calib_split: int = 1000
    train_images: int | None = None
    test_images: int | None = None
    eval_batch_size: int = 500


def default_recipe(arch: Arch, stem: Stem, *, smoke: bool = False, seed: int = 0) -> Recipe:
    """The default recipe, or the smoke preset: same code path, a few hundred images."""
    if smoke:
        return Recipe(arch, stem, epochs=2, batch_size=32, lr=0.05, seed=seed, val_split=64,
                      calib_split=32, train_images=256, test_images=256, eval_batch_size=128)
    return Recipe(arch, stem, epochs=DEFAULT_EPOCHS[arch], batch_size=128, lr=0.1, seed=seed)


@dataclass(frozen=True)
class StepRecord:
    """One optimisation step: the learning rate it used, its (label-smoothed) loss, correct
    predictions in its augmented batch, and its wall time."""

    step: int  # steps done after this one
    epoch: int
    lr: float
    loss: float
    correct: int
    batch: int
    seconds: float


@dataclass(frozen=True)
class EpochRecord:
    """Training means over an epoch's steps and the validation metrics after it (plain
    cross-entropy, top-1 accuracy with its 95% Wilson interval)."""

    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_ci_low: float
    val_ci_high: float
    train_seconds: float


@dataclass
class History:
    """What a run has done so far, across interrupted sessions (it travels in the state)."""

    steps: list[StepRecord] = field(default_factory=list)
    epochs: list[EpochRecord] = field(default_factory=list)
    train_seconds: float = 0.0
    sessions: int = 0


@dataclass(frozen=True)
class FitResult:
    """The model after :func:`fit`, its history, and how far the schedule got;
    ``interrupted`` when a KeyboardInterrupt (Ctrl-C) stopped it."""

    model: nn.Module
    history: History
    step: int
    total_steps: int
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        return self.step >= self.total_steps


class TrainError(ValueError):
    """A run that cannot start as asked; the message says why and what to do."""


class ResumeError(TrainError):
    """A state file that cannot be resumed under the requested recipe."""


class DivergedError(TrainError):
    """The training loss or the weights became NaN or infinite; nothing was saved."""


@contextmanager
def _sigint_held():
    """Hold a Ctrl-C until the block ends, then raise it: an optimizer update interrupted
    half-way would leave weights, momenta and step counter out of step with each other."""
    # Only the main thread can set handlers, and a handler someone else installed (or
    # SIG_IGN) is theirs to keep; in both cases the block runs as it is.
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending = []
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def batch_tensors(images: np.ndarray, labels: np.ndarray, *, crop_pad: int = 0,
                  flip: bool = False, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 28, 28) images → channels-last (N, 1, 32, 32) input, optionally augmented.

    The random shift pads with the background value of :func:`qerror.data.to_tensor` (a
    zero pixel after normalisation), so a shifted image looks like an unshifted one with
    the object moved by up to ``crop_pad`` pixels in each direction.
    """
    x = data.to_tensor(images)
    n = x.shape[0]
    if crop_pad:
        background = -data.MEAN / data.STD
        padded = nn.functional.pad(x, (crop_pad,) * 4, value=background)
        off = torch.randint(0, 2 * crop_pad + 1, (2, n), generator=generator)
        rows = (off[0, :, None] + torch.arange(32))[:, :, None]
        cols = (off[1, :, None] + torch.arange(32))[:, None, :]
        x = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    y = torch.from_numpy(np.ascontiguousarray(labels)).long()
    return x.contiguous(memory_format=torch.channels_last), y


@torch.inference_mode()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> tuple[float, int]:
    """Mean cross-entropy and the number of correct top-1 predictions (evaluation mode)."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for lo in range(0, len(labels), batch_size):
        x, y = batch_tensors(images[lo:lo + batch_size], labels[lo:lo + batch_size])
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train(was_training)
    return loss / len(labels), correct


def _optimizer(model: nn.Module, recipe: Recipe, total_steps: int):
    # BatchNorm parameters and biases are not decayed, the usual practice for ResNets
    # ("no bias decay", Goyal et al., 2017).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=total_steps, pct_start=recipe.warmup_fraction,
        anneal_strategy="cos", base_momentum=recipe.momentum - 0.05,
        max_momentum=recipe.momentum + 0.05)
    return opt, sched


def _save_state(path: Path, recipe: Recipe, step: int, model, opt, sched,
                history: History) -> None:
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "recipe": jsonable(recipe),
             "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(),
             "history": {"steps": [asdict(r) for r in history.steps],
                         "epochs": [asdict(r) for r in history.epochs],
                         "train_seconds": history.train_seconds,
                         "sessions": history.sessions}}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_state(path: Path, recipe: Recipe) -> dict:
    hint = f"delete {path} or pass --no-resume to start over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or truncated files
        raise ResumeError(f"the training state {path} is unreadable ({type(exc).__name__}: "
                          f"{exc}); {hint}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT \
            or state.get("version") != STATE_VERSION:
        raise ResumeError(f"{path} is not a version-{STATE_VERSION} training state; {hint}")
    saved = state.get("recipe")
    if not isinstance(saved, dict):
        raise ResumeError(f"the training state {path} records no recipe; {hint}")
    differ = [f"{k}: {saved.get(k)!r} saved, {v!r} now" for k, v in jsonable(recipe).items()
              if saved.get(k) != v]
    if differ:
        raise ResumeError(f"the training state {path} was written by a different recipe ("
                          + "; ".join(differ) + f"). Rerun with the same arguments, or {hint}")
    return state


def fit(recipe: Recipe, splits: data.Splits, state_path: Path, *, resume: bool = True,
        checkpoint_every: int = 100, stop_after_steps: int | None = None,
        time_budget_s: float | None = None, progress: bool = True) -> FitResult:
    """Train (or continue training) ``recipe`` on ``splits.train``, validating each epoch.

    Parameters
    ----------
    recipe : Recipe
    splits : qerror.data.Splits
        ``train`` (cut to ``recipe.train_images``) is trained on, ``val`` evaluated after
        each epoch; ``test`` is not touched.
    state_path : Path
        Resumable state, written every ``checkpoint_every`` steps, at each epoch's end and
        when stopping early.
    resume : bool
        Continue from ``state_path`` if it exists (else start over, replacing it).
    stop_after_steps : int, optional
        Stop once this many steps are done in total (for splitting a run, and for tests).
    time_budget_s : float, optional
        Stop before a step that would take the accumulated training time past this.

    Returns
    -------
    FitResult
        ``complete`` is false when the run stopped early or was interrupted (a
        KeyboardInterrupt, ``interrupted``); the state at the last completed step is then
        saved.

    Raises
    ------
    TrainError
        Too few training images for one batch.
    ResumeError
        The state file is unreadable or was written by a different recipe.
    DivergedError
        The loss or the weights became NaN or infinite; the message gives the step and
        epoch. No state is saved past the last finite one.
    """
    train = splits.train
    if recipe.train_images is not None:
        if recipe.train_images > len(train):
            raise TrainError(f"train_images={recipe.train_images} but the training split "
                             f"holds {len(train)} images")
        train = train.subset(np.arange(recipe.train_images))
    per_epoch = len(train) // recipe.batch_size
    if per_epoch < 1:
        raise TrainError(f"batch size {recipe.batch_size} exceeds the {len(train)} training "
                         "images")
    total = per_epoch * recipe.epochs
    model = fashion_resnet(recipe.arch, recipe.stem, seed=recipe.seed)
    model = model.to(memory_format=torch.channels_last).train()
    opt, sched = _optimizer(model, recipe, total)
    history, step = History(), 0
    if resume and state_path.is_file():
        state = _load_state(state_path, recipe)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        h = state["history"]
        history = History([StepRecord(**r) for r in h["steps"]],
                          [EpochRecord(**r) for r in h["epochs"]], float(h["train_seconds"]),
                          int(h["sessions"]))
        print(f"[train] resuming {state_path.name} at step {step} of {total}", flush=True)
    elif state_path.is_file():
        state_path.unlink()
    history.sessions += 1
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    order, order_epoch = None, -1
    session_times: list[float] = []
    bar = tqdm(total=total, initial=step, unit="step", desc=f"{recipe.arch.value} train",
               disable=not progress, dynamic_ncols=True, mininterval=1.0)

    saved = step

    def diverged(what: str, at_step: int) -> DivergedError:
        kept = (f"; the state of step {saved} stays in {state_path}" if state_path.is_file()
                else "")
        return DivergedError(
            f"training diverged: {what} at step {at_step} of {total} (epoch "
            f"{(at_step - 1) // per_epoch + 1} of {recipe.epochs}, peak learning rate "
            f"{recipe.lr:g}). No checkpoint was written{kept}. Start over with a lower --lr "
            "and --no-resume.")

    def save() -> None:
        nonlocal saved
        if saved != step or not state_path.is_file():
            bad = non_finite_tensors(model.state_dict())
            if bad:
                raise diverged("the weights became non-finite (" + "; ".join(bad[:3])
                               + (f"; {len(bad) - 3} more" if len(bad) > 3 else "") + ")", step)
            _save_state(state_path, recipe, step, model, opt, sched, history)
            saved = step

    def record_epoch_if_due() -> None:
        # Also on resuming, in case the run was interrupted during an epoch's validation.
        if step and step % per_epoch == 0 and len(history.epochs) < step // per_epoch:
            epoch = step // per_epoch - 1
            t1 = time.perf_counter()
            history.epochs.append(_epoch_record(model, recipe, splits.val, history, epoch,
                                                step))
            history.train_seconds += time.perf_counter() - t1
            e = history.epochs[-1]
            bar.write(f"[train] epoch {epoch + 1}/{recipe.epochs}: train loss "
                      f"{e.train_loss:.4f}, val accuracy {e.val_accuracy:.4f} "
                      f"[{e.val_ci_low:.4f}, {e.val_ci_high:.4f}]")

    interrupted = False
    try:
        record_epoch_if_due()
        while step < total:
            if stop_after_steps is not None and step >= stop_after_steps:
                break
            last_s = history.steps[-1].seconds if history.steps else 0.0
            if time_budget_s is not None and history.train_seconds + last_s > time_budget_s:
                bar.write(f"[train] the time budget of {time_budget_s / 60:.1f} min is spent at "
                          f"step {step} of {total}")
                break
            t0 = time.perf_counter()
            epoch, i = divmod(step, per_epoch)
            if epoch != order_epoch:
                order = np.random.default_rng([recipe.seed, _ORDER_STREAM, epoch]) \
                    .permutation(len(train))
                order_epoch = epoch
            idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            aug = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [recipe.seed, _AUGMENT_STREAM, epoch, i]).generate_state(1)[0]))
            x, y = batch_tensors(train.images[idx], train.labels[idx], crop_pad=recipe.crop_pad,
                                 flip=recipe.flip, generator=aug)
            lr = sched.get_last_lr()[0]
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = criterion(out, y)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise diverged(f"the loss became {loss_value}", step + 1)
            loss.backward()
            with _sigint_held():
                opt.step()
                sched.step()
                step += 1
                dt = time.perf_counter() - t0
                history.train_seconds += dt
                history.steps.append(StepRecord(step, epoch, lr, loss_value,
                                                int((out.argmax(1) == y).sum()), len(y), dt))
            session_times.append(dt)
            bar.update(1)
            bar.set_postfix(loss=f"{history.steps[-1].loss:.3f}", lr=f"{lr:.3g}", refresh=False)
            if len(session_times) == _ESTIMATE_STEPS + 1 and step < total:
                _print_estimate(bar, recipe, session_times[1:], total - step,
                                total // per_epoch - epoch, len(splits.val), time_budget_s,
                                history.train_seconds)
            record_epoch_if_due()
            if step % per_epoch == 0 or step % checkpoint_every == 0:
                save()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    save()
    return FitResult(model, history, step, total, interrupted)


def _epoch_record(model, recipe: Recipe, val: data.ImageSet, history: History, epoch: int,
                  step: int) -> EpochRecord:
    rows = [r for r in history.steps if r.epoch == epoch]
    val_loss, correct = evaluate(model, val.images, val.labels, recipe.eval_batch_size)
    ci = wilson_ci(correct, len(val)).ci
    return EpochRecord(epoch + 1, step, float(np.mean([r.loss for r in rows])),
                       sum(r.correct for r in rows) / sum(r.batch for r in rows), val_loss,
                       correct / len(val), float(ci[0]), float(ci[1]), history.train_seconds)


def _print_estimate(bar, recipe: Recipe, times: list[float], steps_left: int, epochs_left: int,
                    n_val: int, budget_s: float | None, spent_s: float) -> None:
    step_s = float(np.median(times))
    # A forward pass costs about a third of a training step per image.
    val_s = epochs_left * n_val / recipe.batch_size * step_s / 3
    total_s = steps_left * step_s + val_s
    msg = (f"[train] {step_s:.2f} s/step over {len(times)} steps: the {steps_left} steps left "
           f"take about {steps_left * step_s / 60:.1f} min, plus {val_s / 60:.1f} min of "
           f"validation, about {(spent_s + total_s) / 60:.1f} min in all")
    if budget_s is not None and spent_s + total_s > budget_s:
        msg += (f"; that exceeds the budget of {budget_s / 60:.1f} min, so the run will stop at "
                "the budget with its state saved (raise --time-budget-min or lower --epochs)")
    bar.write(msg)


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
    """--time-budget-min: finite and above 0; "no limit" is said by leaving it out."""
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err} (leave it out for no limit)") from None


def build_parser():
    parser = base_parser("train", __doc__.splitlines()[0], force=True)
    parser.set_defaults(out=None)
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
                        help="peak one-cycle learning rate, finite and above 0 (default 0.1)")
    parser.add_argument("--data-root", type=Path, help="folder with the Fashion-MNIST IDX files")
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
    parser.add_argument("--checkpoint", type=Path,
                        help="where the trained model goes (default: the cache, "
                             "qerror.nn.models.default_checkpoint_path)")
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
    state_path = checkpoint.with_name(checkpoint.stem + ".train-state.pt")
    out = args.out or REPO / "runs" / "train" / tag
    # Both destinations are checked before hours of training, not after.
    check_out(out, "train", force=args.force)
    # A run cut while writing its results has saved the checkpoint but kept its state:
    # rerunning the command finishes it and may replace that checkpoint.
    _check_checkpoint_target(checkpoint, force=args.force or (args.resume and
                                                              state_path.is_file()))

    try:
        splits = data.fashion_mnist_splits(args.data_root, val=recipe.val_split,
                                           calib=recipe.calib_split, download=args.download)
        result = fit(recipe, splits, state_path, resume=args.resume,
                     checkpoint_every=args.checkpoint_every,
                     stop_after_steps=args.stop_after_steps,
                     time_budget_s=None if args.time_budget_min is None
                     else args.time_budget_min * 60, progress=args.progress)
    except (data.DataNotFoundError, data.DataError, TrainError) as exc:
        print(f"[train] error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[train] interrupted before training started or resumed; no file was changed.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    command = shlex.join(["python", "-m", "studies.train", *argv])
    if result.interrupted:
        print(f"[train] interrupted at step {result.step} of {result.total_steps}; the state is "
              f"saved in {state_path}. To continue, run the same command: {command}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if not result.complete:
        if args.stop_after_steps is not None and result.step >= args.stop_after_steps:
            how = "without --stop-after-steps, or with a larger one"
        else:
            how = "with a larger --time-budget-min, or without one"
        print(f"[train] stopped at step {result.step} of {result.total_steps}; the state is in "
              f"{state_path}. To continue, run the same command {how}.", flush=True)
        return EXIT_INCOMPLETE
    try:
        return _write_results(recipe, splits, result, checkpoint, state_path, out, argv,
                              args.smoke)
    except KeyboardInterrupt:
        print(f"[train] interrupted while writing the results; the trained state is kept in "
              f"{state_path}. To write them, run the same command: {command}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _check_checkpoint_target(path: Path, *, force: bool) -> None:
    """StudyError unless ``path`` may receive the trained checkpoint.

    A missing file may; a qerror checkpoint (it has its sidecar) may with ``force``; any
    other file is never replaced, nor is a folder.
    """
    if path.is_dir():
        raise StudyError(f"--checkpoint {path} is a folder; pass the name of a file, e.g. "
                         f"--checkpoint {path / 'model.pt'}")
    if not path.exists():
        return
    if not sidecar_path(path).is_file():
        raise StudyError(f"--checkpoint {path} is an existing file that is not a qerror "
                         f"checkpoint (it has no {sidecar_path(path).name} beside it); it is "
                         "never replaced, with --force neither. Pass the name of a new file")
    if not force:
        raise StudyError(f"--checkpoint {path} already holds a trained checkpoint; pass --force "
                         "to replace it with the one this run trains, or another --checkpoint")


def _write_results(recipe: Recipe, splits: data.Splits, result: FitResult, checkpoint: Path,
                   state_path: Path, out: Path, argv: list[str], smoke: bool) -> int:
    """Test once, then write the checkpoint, the run folder and its manifest; the state
    file goes last, so an interrupted write is finished by rerunning the command."""
    test = splits.test if recipe.test_images is None else \
        splits.test.subset(np.arange(min(recipe.test_images, len(splits.test))))
    test_loss, correct = evaluate(result.model, test.images, test.labels, recipe.eval_batch_size)
    test_ci = wilson_ci(correct, len(test))
    history = result.history
    steps = pd.DataFrame([asdict(r) for r in history.steps])
    epochs = pd.DataFrame([asdict(r) for r in history.epochs])
    step_s = float(steps["seconds"].median())
    metrics = {"test_accuracy": correct / len(test), "test_ci": list(test_ci.ci),
               "test_n": len(test), "test_loss": test_loss,
               "val_accuracy": float(epochs["val_accuracy"].iloc[-1]),
               "val_n": len(splits.val), "train_seconds": history.train_seconds,
               "median_step_seconds": step_s, "steps": result.step,
               "sessions": history.sessions, "torch_threads": torch.get_num_threads()}
    data_identity = {"source": splits.train.source, "train_sha256": splits.train.sha256,
                     "val_sha256": splits.val.sha256, "test_sha256": test.sha256}
    info = save_checkpoint(result.model, checkpoint, arch=recipe.arch, stem=recipe.stem,
                           config={"recipe": recipe, "data": data_identity}, metrics=metrics)
    config = {"recipe": jsonable(recipe), "checkpoint": str(checkpoint),
              "state": str(state_path), "smoke": smoke}
    timing_keys = ("train_seconds", "median_step_seconds", "torch_threads")
    with RunDir(out, "train", argv, config) as run:
        # Measured times go to files of their own, named in the manifest, so a rerun of the
        # same command writes the other outputs byte for byte. The checkpoint's sha256 is
        # in the manifest: the checkpoint records when it was made and how long it took.
        run.write_csv("epochs.csv", epochs.drop(columns="train_seconds"))
        run.write_csv("steps.csv", steps.drop(columns="seconds"))
        run.write_csv("step_seconds.csv", steps[["step", "seconds"]], timing=True)
        run.write_json("timing.json", {**{k: metrics[k] for k in timing_keys},
                                       "epoch_train_seconds": epochs["train_seconds"].tolist()},
                       timing=True)
        run.write_json("summary.json", {"recipe": recipe, "checkpoint": str(checkpoint),
                                        **{k: v for k, v in metrics.items()
                                           if k not in timing_keys}})
        _figure(run, steps, epochs, result.total_steps // recipe.epochs,
                metrics["test_accuracy"], test_ci.ci,
                f"{recipe.arch.value}, {recipe.stem.value} stem, Fashion-MNIST")
        run.extra = {"model": {"arch": recipe.arch.value, "stem": recipe.stem.value,
                               "checkpoint": str(checkpoint), "sha256": info.sha256},
                     "data": data_identity}
        final = run.finish()
    state_path.unlink(missing_ok=True)
    print(f"[train] {recipe.arch.value}/{recipe.stem.value}: test accuracy "
          f"{metrics['test_accuracy']:.4f} [{test_ci.ci[0]:.4f}, {test_ci.ci[1]:.4f}] "
          f"(n={len(test)}) after {history.train_seconds / 60:.1f} min of training; "
          f"checkpoint {checkpoint}; run {final}")
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
        Also when training stopped before the end; the message says how to resume.
    """
    arch, stem = Arch.parse(arch), Stem.parse(stem)
    path = Path(path) if path is not None else default_checkpoint_path(arch, stem)
    if not path.exists() and train_if_missing:
        # --force replaces only a previous training run in this study's default folder.
        argv = ["--arch", arch.value, "--stem", stem.value, "--checkpoint", str(path), "--force"]
        if data_root is not None:
            argv += ["--data-root", str(data_root)]
        if download:
            argv.append("--download")
        argv += list(train_args)
        command = f"python -m studies.train {' '.join(argv)}"
        print(f"[qerror] no {arch.value}/{stem.value} baseline at {path}; training it with "
              f"`{command}`", flush=True)
        code = main(argv)
        if code in (EXIT_INCOMPLETE, EXIT_INTERRUPTED):
            raise CheckpointError(
                f"training the {arch.value}/{stem.value} baseline stopped with exit code "
                f"{code}; run the same command again to resume it: {command}")
        if code != 0:
            raise CheckpointError(
                f"training the {arch.value}/{stem.value} baseline failed with exit code {code} "
                f"for the reason printed above; correct it, then run: {command}")
    return get_baseline(arch, stem, path=path)


main = study_main(_main)


if __name__ == "__main__":
    raise SystemExit(main())
