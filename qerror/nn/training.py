"""One training loop for every network the project trains, on one process or many.

:func:`fit` trains a model with SGD (Nesterov momentum, no weight decay on biases and
BatchNorm) on a one-cycle or constant learning rate, validating after each epoch. It serves
the Fashion-MNIST baseline (``python -m studies.train``), exit heads trained on a frozen
backbone (``trainable=``) and pruning fine-tuning (``after_step=`` re-applies the masks).

* **Deterministic**: the batch order is a function of (seed, epoch) and each batch's random
  generator of (seed, epoch, step in epoch), so a resumed run repeats an uninterrupted one
  step for step, and a rerun writes the same weights. A network that draws from torch's
  global generator itself (dropout) resumes step for step in one process, whose generator
  the state keeps; under several ranks only rank 0's would be, so it is not restored.
  Step for step means bit for bit only in the same environment (torch's thread count and
  version, the device, the CPU's vector kernels, the number of ranks): each session's is
  recorded in the state, and resuming in another warns
  (:class:`EnvironmentChangedWarning`).
* **Resumable**: every ``checkpoint_every`` steps, at each epoch's end and when stopping
  early the model, optimizer, scheduler, step counter, history and global generator go to
  ``state_path`` (atomically). A state file resumes only under the configuration that
  wrote it, into a network it fits (checked before anything is loaded).
* **Bounded**: ``stop_after_steps`` and ``time_budget_s`` stop with the state saved; Ctrl-C
  (KeyboardInterrupt) saves the state at the last completed step; a non-finite loss or
  weights stop with the step (:class:`DivergedError`), saving nothing past the last finite
  state, and returning no network with non-finite weights.
* **Scaled out**: under ``torchrun`` (:func:`distributed`), DistributedDataParallel with
  gloo on CPUs and NCCL on GPUs; each rank computes its contiguous share of every global
  batch, rank 0 alone writes the state and shows progress.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
import warnings
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from qerror._checks import check_count, check_flag, check_seed, is_real, listing
from qerror._enums import Choice
from qerror.cpu import flush_denormal
from qerror.files import atomic_write, jsonable, torch_save
from qerror.interrupts import sigint_held
from qerror.nn import parallel
from qerror.nn.models import StateDictMismatchError, check_state_dict, non_finite_tensors
from qerror.stats import wilson_ci

STATE_FORMAT = "qerror-train-state"
STATE_VERSION = 3
# A state of the version before, which resumes in one process (see _load_state).
_OLDER_STATE = 2
# Recipe entries states of this version did not record at first.
_RECORDED_SINCE_V3 = ("n_train",)
# Independent random streams derived from the one seed.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1
# Steps timed (after the first, which includes kernel selection) before the estimate.
_ESTIMATE_STEPS = 3
# torchrun sets these in every worker it starts.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class Schedule(Choice):
    """The learning-rate schedule of :class:`TrainConfig`.

    ``ONE_CYCLE``
        ``torch.optim.lr_scheduler.OneCycleLR``: cosine warm-up to ``lr`` over
        ``warmup_fraction`` of the steps, cosine annealing after, momentum cycled by ±0.05
        against it (Smith & Topin 2019).
    ``CONSTANT``
        ``lr`` at every step (fine-tuning).
    """

    ONE_CYCLE = "one-cycle"
    CONSTANT = "constant"


class Device(Choice):
    """Where a network runs: ``CPU``, ``CUDA`` (one GPU per rank under torchrun), or
    ``AUTO`` (CUDA where torch finds a GPU, else the CPU)."""

    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


@dataclass(frozen=True)
class TrainConfig:
    """Everything of the optimisation that determines the trained weights.

    Parameters
    ----------
    epochs : int
        Passes over the training set; each has ``n_train // batch_size`` steps (the last,
        incomplete batch is dropped).
    batch_size : int
        The global batch: under torchrun each of W ranks computes ``batch_size / W`` of it.
    lr : float
        Peak learning rate (one-cycle) or the learning rate (constant).
    seed : int
        Seed of the batch order and of each batch's generator.
    momentum : float
        SGD momentum (the middle of the one-cycle momentum range).
    nesterov : bool
        Nesterov momentum.
    weight_decay : float
        L2 decay of weights with more than one dimension; biases and BatchNorm parameters
        are not decayed.
    label_smoothing : float
        Of the default cross-entropy loss.
    schedule : Schedule
    warmup_fraction : float
        Fraction of the steps spent warming up (one-cycle only).
    channels_last : bool
        Put the model in channels-last memory format (the batches should match).

    Notes
    -----
    Not decaying biases and BatchNorm parameters ("no bias decay") follows Goyal et al.
    The run-control arguments of :func:`fit` (how often to save, when to stop, whether to
    show progress) are not here: they do not change the weights, so changing them never
    stops a run from resuming.

    The config and the seed fix the weights bit for bit only together with the environment
    that computes them: torch's intra-op thread count (``torch.set_num_threads``,
    ``OMP_NUM_THREADS``), the torch version, the device, the CPU's vector kernels
    (``torch.backends.cpu.get_cpu_capability()``: AVX2 and AVX-512 sum in other orders) and
    the number of ranks all change float round-off, which training then amplifies. A rerun
    or a resumed run elsewhere trains the same recipe, but not the same bits.

    References
    ----------
    Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017.
    Smith & Topin, "Super-Convergence", 2019.
    """

    epochs: int
    batch_size: int
    lr: float
    seed: int = 0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: Schedule = Schedule.ONE_CYCLE
    warmup_fraction: float = 0.25
    channels_last: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", Schedule.parse(self.schedule))
        for name, low in (("epochs", 1), ("batch_size", 1)):
            check_count(getattr(self, name), f"TrainConfig.{name}", low)
        object.__setattr__(self, "seed", check_seed(self.seed, "TrainConfig.seed"))
        for name in ("nesterov", "channels_last"):
            object.__setattr__(self, name, check_flag(getattr(self, name), f"TrainConfig.{name}"))
        checks = {"lr": (self.lr, 0.0, math.inf, False), "momentum": (self.momentum, 0, 1, True),
                  "weight_decay": (self.weight_decay, 0, math.inf, True),
                  "label_smoothing": (self.label_smoothing, 0, 1, True),
                  "warmup_fraction": (self.warmup_fraction, 0, 1, False)}
        for name, (value, lo, hi, closed) in checks.items():
            # np.float32 is no float to isinstance
            ok = is_real(value) and math.isfinite(value) and value < hi \
                and (value >= lo if closed else value > lo)
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be a finite number in "
                                 f"{'[' if closed else '('}{lo}, {hi}), got {value!r}")
            object.__setattr__(self, name, float(value))  # the recipe holds plain numbers
        if self.schedule is Schedule.ONE_CYCLE and not 0.05 <= self.momentum < 0.95:
            raise ValueError(f"TrainConfig.momentum={self.momentum} leaves no room for the "
                             "one-cycle range momentum ± 0.05 within [0, 1): pick a momentum "
                             "in [0.05, 0.95), or schedule=Schedule.CONSTANT")
        if self.nesterov and self.momentum == 0:
            raise ValueError("Nesterov momentum needs TrainConfig.momentum > 0")


@dataclass(frozen=True)
class Batch:
    """What the batch function of :func:`fit` builds one step's tensors from.

    Attributes
    ----------
    epoch, index, step : int
        Epoch (from 0), step within the epoch, and steps done before this one.
    indices : numpy.ndarray
        The global batch: ``batch_size`` indices into the training set, shape (B,).
    shard : slice
        The positions in ``indices`` this rank computes (all of them on one process).
    generator : torch.Generator
        Seeded by (seed, epoch, index), the same on every rank. Draw the random numbers of
        the whole global batch and keep the shard's rows, so that a sample is augmented the
        same way on any number of ranks.
    """

    epoch: int
    index: int
    step: int
    indices: np.ndarray
    shard: slice
    generator: torch.Generator


# The training set, as the loop sees it: a Batch in, (input, target) of the shard out.
BatchFn = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]


def tensor_batches(x: torch.Tensor, y: torch.Tensor) -> BatchFn:
    """A batch function over in-memory tensors (no augmentation).

    Parameters
    ----------
    x : torch.Tensor
        Inputs, shape (N, ...).
    y : torch.Tensor
        Targets, shape (N, ...).

    Returns
    -------
    callable
        ``batch -> (x[rows], y[rows])`` with ``rows = batch.indices[batch.shard]``; its
        ``len`` is the samples it holds, which :func:`fit` checks ``n_train`` against.
    """
    if len(x) != len(y):
        raise ValueError(f"x holds {len(x)} samples but y {len(y)}")
    return _TensorBatches(x, y)


class _TensorBatches:
    """:func:`tensor_batches`' batch function: a callable with a length."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __call__(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.ascontiguousarray(b.indices[b.shard]))
        return self.x[rows], self.y[rows]


@dataclass(frozen=True)
class Evaluation:
    """A validation pass: mean loss over ``n`` samples and ``correct`` top-1 predictions."""

    loss: float
    correct: int
    n: int


@dataclass(frozen=True)
class StepRecord:
    """One optimisation step: the learning rate it used, its loss (the mean over the global
    batch), correct predictions in its batch, and its wall time (rank 0's)."""

    step: int  # steps done after this one
    epoch: int
    lr: float
    loss: float
    correct: int
    batch: int
    seconds: float


@dataclass(frozen=True)
class EpochRecord:
    """Training means over an epoch's steps and the validation metrics after it (loss, top-1
    accuracy with its 95% Wilson interval; NaN when no validation was given).
    ``train_seconds`` is :attr:`History.train_seconds` after this epoch's validation: the
    wall time of every session so far, steps and validations, not this epoch's alone."""

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
    """What a run has done so far, across interrupted sessions (it travels in the state).

    Attributes
    ----------
    steps, epochs : list
        A :class:`StepRecord` per step and an :class:`EpochRecord` per epoch.
    train_seconds : float
        Wall time of the steps and the validations of every session (rank 0's clock):
        what ``time_budget_s`` counts.
    sessions : int
        Calls of :func:`fit` that trained or resumed the run.
    environments : list of dict or None
        One per session, in order: what besides the recipe decides the float round-off
        (``torch_version``, ``device_type``, ``gpu`` on CUDA, ``cpu_capability``,
        ``torch_threads``, ``world_size``; rank 0's). None for the sessions of a state
        written before they were recorded.
    val_seconds : list of float
        Wall time of each validation (rank 0), in order; a state written before they were
        recorded starts it empty.
    """

    steps: list[StepRecord] = field(default_factory=list)
    epochs: list[EpochRecord] = field(default_factory=list)
    train_seconds: float = 0.0
    sessions: int = 0
    environments: list[dict[str, Any] | None] = field(default_factory=list)
    val_seconds: list[float] = field(default_factory=list)


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
        """Every step done and nothing interrupted (an interrupted last epoch's validation
        leaves its record missing)."""
        return self.step >= self.total_steps and not self.interrupted


class TrainError(ValueError):
    """A run that cannot start as asked; the message says why and what to do."""


class ResumeError(TrainError):
    """A state file that cannot be resumed under the requested configuration."""


class DivergedError(TrainError):
    """The training loss or the weights became NaN or infinite; nothing was saved past the
    last finite state. ``step`` and ``epoch`` (from 1) say where."""

    def __init__(self, message: str, *, step: int, epoch: int):
        super().__init__(message)
        self.step, self.epoch = step, epoch


class DeviceError(TrainError):
    """The requested device is not available here."""


class EnvironmentChangedWarning(UserWarning):
    """A run resumed in another environment (torch threads or version, device, CPU kernels,
    ranks) than the sessions that wrote its state: it goes on, but its weights will not be
    the uninterrupted run's bit for bit."""


# --------------------------------------------------------------------------- distribution


@dataclass(frozen=True)
class Placement:
    """This process's rank among ``world_size`` and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0


def torchrun_ranks(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it.

    Raises
    ------
    TrainError
        Some of RANK, WORLD_SIZE, LOCAL_RANK are set and others not, or they are not
        integers with 0 <= rank < world size.
    """
    env = os.environ if environ is None else environ
    present = [k for k in _TORCHRUN_ENV if k in env]
    if not present:
        return 0, 1, 0
    if len(present) != len(_TORCHRUN_ENV):
        missing = [k for k in _TORCHRUN_ENV if k not in env]
        raise TrainError(f"{', '.join(present)} set but {', '.join(missing)} not: start "
                         "distributed runs with torchrun, which sets all three")
    try:
        rank, world, local = (int(env[k]) for k in _TORCHRUN_ENV)
    except ValueError:
        raise TrainError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                         + ", ".join(f"{k}={env[k]!r}" for k in _TORCHRUN_ENV)) from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise TrainError(f"torchrun environment out of range: RANK={rank}, WORLD_SIZE={world}, "
                         f"LOCAL_RANK={local}")
    return rank, world, local


def resolve_device(device: Device | str | torch.device, local_rank: int = 0) -> torch.device:
    """The torch device for ``device`` (``cuda`` becomes ``cuda:<local_rank>``; ``auto``
    is ``cuda`` where ``torch.cuda.is_available()``, else ``cpu``; a ``torch.device`` or a
    string such as ``"cuda:1"`` keeps its index).

    Raises
    ------
    DeviceError
        CUDA asked for where it is not available, or fewer GPUs than ``local_rank + 1``.
    TypeError, ValueError
        ``local_rank`` is not an int >= 0.
    """
    local_rank = check_count(local_rank, "local_rank")
    if isinstance(device, str) and ":" in device:  # "cuda:1", as torch spells a device
        try:
            device = torch.device(device)
        except RuntimeError as err:
            raise DeviceError(f"device {device!r} is not a device torch knows: {err}") from None
    if isinstance(device, torch.device):
        kind = Device.parse(device.type)
        if kind is Device.CUDA and device.index is not None:
            local_rank = device.index
    else:
        kind = Device.parse(device)
    if kind is Device.AUTO:
        kind = Device.CUDA if torch.cuda.is_available() else Device.CPU
    if kind is Device.CPU:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"device cuda was asked for, but torch {torch.__version__} ({build}) "
                          "finds no usable GPU here (torch.cuda.is_available() is False); "
                          "train on the CPU (--device cpu) or on a machine with a GPU")
    if local_rank >= torch.cuda.device_count():
        raise DeviceError(f"local rank {local_rank} needs GPU {local_rank}, but only "
                          f"{torch.cuda.device_count()} are visible; start at most that many "
                          "processes per node (torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


def disable_tf32() -> dict[str, bool]:
    """Turn TF32 off for cuDNN convolutions and CUDA matrix products; returns the settings
    now in force, for a manifest.

    Notes
    -----
    PyTorch lets cuDNN convolutions use TF32 (a 10-bit mantissa) on Ampere and later GPUs by
    default. That changes the float reference itself by far more than float32 round-off, so
    measurements that compare a quantized network with its float one must turn it off.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


@contextlib.contextmanager
def distributed(device: Device | str = Device.CPU) -> Iterator[Placement]:
    """This process's :class:`Placement`, in torchrun's process group for the block.

    Outside torchrun (no RANK/WORLD_SIZE/LOCAL_RANK in the environment, or a world of one)
    this is a single process on ``device``. Under torchrun the process joins the group by
    ``env://`` with gloo on CPUs and NCCL on GPUs (one GPU per local rank) and leaves it
    after the block, unless the group existed before.

    Yields
    ------
    Placement

    Raises
    ------
    DeviceError, TrainError
        As :func:`resolve_device` and :func:`torchrun_ranks`.
    """
    rank, world, local = torchrun_ranks()
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    joined = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world)
        joined = True
    try:
        yield Placement(rank, world, local, dev)
    finally:
        if joined:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- the loop


def _select(model: nn.Module, trainable) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if trainable is None:
        return names
    if callable(trainable):
        chosen = [n for n in names if trainable(n)]
    else:
        wanted = set(trainable)
        unknown = sorted(wanted - set(names))
        if unknown:
            raise TrainError(f"trainable names {len(unknown)} parameters the model does not "
                             f"have: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5
                                                                  else "")
                             + f" (it has e.g. {', '.join(names[:3])})")
        chosen = [n for n in names if n in wanted]
    if not chosen:
        raise TrainError("trainable selects none of the model's parameters; nothing to train")
    return chosen


def _optimizer(params: dict[str, nn.Parameter], config: TrainConfig, total_steps: int):
    decay = [p for p in params.values() if p.ndim > 1]
    no_decay = [p for p in params.values() if p.ndim <= 1]
    groups = [{"params": g, "weight_decay": wd}
              for g, wd in ((decay, config.weight_decay), (no_decay, 0.0)) if g]
    opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                          nesterov=config.nesterov)
    if config.schedule is Schedule.ONE_CYCLE:
        # OneCycleLR ends its warm-up at step warmup_fraction * total_steps - 1 and divides
        # by that phase's length: a run too short for one warm-up step fails inside it with
        # a ZeroDivisionError, so it is refused here with what to change.
        warm = config.warmup_fraction * total_steps
        if not 1 < warm < total_steps:
            raise TrainError(
                f"{total_steps} steps are too few for the one-cycle schedule: its warm-up "
                f"({config.warmup_fraction:g} of the steps) must span more than one step and "
                "end before the last; train on more samples or epochs or with a smaller "
                "batch size (the studies' --epochs, --batch-size and image-count options), "
                "or, in Python, use Schedule.CONSTANT")
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=total_steps, pct_start=config.warmup_fraction,
            anneal_strategy="cos", base_momentum=config.momentum - 0.05,
            max_momentum=config.momentum + 0.05)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, sched


def _recipe(config: TrainConfig, identity: Mapping[str, Any] | None,
            trainable: list[str] | None, n_train: int) -> dict[str, Any]:
    recipe = {**jsonable(config), "n_train": int(n_train)}  # it sets the schedule's length
    extra = dict(jsonable(dict(identity or {})))
    if trainable is not None:
        extra["trainable"] = trainable
    clash = sorted(set(recipe) & set(extra))
    if clash:
        raise ValueError(f"identity repeats TrainConfig fields or n_train "
                         f"({', '.join(clash)}); leave them to the config and fit")
    return {**recipe, **extra}


def _read_state(path: Path) -> dict | TrainError:
    """The training state at ``path``, or why the file cannot be taken as one this loop
    wrote (such a file is never loaded, replaced or deleted).

    The file is read once: its checksums are tested on the very bytes that are loaded, so
    what resumes is what was checked, and a state of hundreds of megabytes is not read
    again for each check.

    A file of another kind, a folder or a link is not ours. A torch archive that does not
    read is one cut short or corrupted after it was written (states are written whole, by
    atomic rename): a copy that stopped, a full disk. At the state path that is most likely
    a damaged state, and the message says so and how to start over."""
    where = ("Pass another path for the training state (studies.train keeps it beside "
             "--checkpoint: pass another --checkpoint)")
    if path.is_symlink() or not path.is_file():
        return TrainError(f"state_path {path} exists and is not a regular file; it is left as "
                          f"it is. {where}")
    with path.open("rb") as f:
        head = f.read(_ARCHIVE_HEAD)
    if not _torch_archive(head):  # every state is one: a foreign file is not read whole
        return TrainError(f"state_path {path} exists and is not a qerror training state (not "
                          f"a torch archive); it is left as it is. {where}")
    raw = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or damaged files
        if _damaged_torch_archive(raw):
            return TrainError(
                f"the training state {path} is damaged: it is a torch archive that does not "
                f"read ({type(exc).__name__}: {exc}), cut short or corrupted after it was "
                "written (a copy that stopped, a full disk), so it cannot be resumed. It is "
                f"left as it is: delete {path} to start over from the first step")
        return TrainError(f"state_path {path} exists and does not read as a qerror training "
                          f"state ({type(exc).__name__}); it is left as it is. {where}")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        return TrainError(f"state_path {path} exists and is not a qerror training state (no "
                          f"format {STATE_FORMAT!r}); it is left as it is. {where}")
    # torch reads a tensor's bytes without their checksum: a state whose data were changed
    # after it was written loads, and would resume with them
    if _damaged_torch_archive(raw):
        return TrainError(
            f"the training state {path} is damaged: a member of its archive fails its "
            "checksum (its bytes changed after it was written), so it cannot be resumed. It "
            f"is left as it is: delete {path} to start over from the first step")
    return state


# a zip member's local header (30 bytes) and room for its name
_ARCHIVE_HEAD = 30 + 256


def _torch_archive(head: bytes) -> bool:
    """Whether ``head``, a file's first bytes, begins as torch.save's zip archive does: a
    first member named ``<name>/data.pkl``."""
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        return False
    name_length = int.from_bytes(head[26:28], "little")
    return head[30:30 + name_length].endswith(b"/data.pkl")


def _damaged_torch_archive(raw: bytes) -> bool:
    """Whether ``raw`` begins as torch.save's zip archive does (:func:`_torch_archive`)
    and is not a whole one: no readable directory at its end (cut short) or a member that
    fails its checksum. A whole archive that does not load holds
    something else than a state (not damaged: foreign)."""
    if not _torch_archive(raw[:_ARCHIVE_HEAD]):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            return archive.testzip() is not None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return True


def _load_state(path: Path, state: dict, recipe: dict[str, Any], world: int) -> dict:
    """``state``, read from ``path`` (by :func:`_read_state`), if it resumes under ``recipe``
    on ``world`` ranks."""
    hint = f"delete {path} or start over without resuming"
    version = state.get("version") if isinstance(state, dict) else None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT \
            or version not in (_OLDER_STATE, STATE_VERSION):
        raise ResumeError(f"{path} is not a version-{STATE_VERSION} training state; {hint}")
    saved = state.get("recipe")
    if not isinstance(saved, dict):
        raise ResumeError(f"the training state {path} records no recipe; {hint}")
    # recorded since: a state written before compares without them (said, not refused)
    unrecorded = [k for k in _RECORDED_SINCE_V3 if k in recipe and k not in saved]
    if version == _OLDER_STATE:
        if world > 1:
            raise ResumeError(
                f"the training state {path} was written before BatchNorm trained on the "
                "statistics of the whole global batch under torchrun; resuming it on several "
                f"ranks would switch halfway. Resume it in one process, or {hint}")
        # what a later version records and this one did not (the training images) cannot
        # be compared: said, not refused
        unrecorded = [k for k in recipe if k not in saved]
    differ = [f"{k}: {saved.get(k)!r} saved, {v!r} now" for k, v in recipe.items()
              if saved.get(k) != v and k not in unrecorded]
    differ += [f"{k}: {saved[k]!r} saved, absent now" for k in saved if k not in recipe]
    if differ:
        raise ResumeError(f"the training state {path} was written by a different recipe ("
                          + "; ".join(differ) + f"). Rerun with the same arguments, or {hint}")
    if unrecorded:
        print(f"[train] {path.name} was written by an older qerror, which did not record "
              f"{', '.join(unrecorded)}: not checked", flush=True)
    return state


def _history(h: dict) -> History:
    sessions = int(h["sessions"])
    # states written before environments and validation times were recorded have none
    environments = list(h.get("environments", []))
    environments = [None] * (sessions - len(environments)) + environments
    return History([StepRecord(**r) for r in h["steps"]], [EpochRecord(**r) for r in h["epochs"]],
                   float(h["train_seconds"]), sessions, environments,
                   [float(t) for t in h.get("val_seconds", [])])


def _environment(dev: torch.device, world: int) -> dict[str, Any]:
    """What, besides the recipe, decides a session's float round-off (see
    :attr:`History.environments`)."""
    env: dict[str, Any] = {"torch_version": str(torch.__version__), "device_type": dev.type}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    env.update(cpu_capability=torch.backends.cpu.get_cpu_capability(),
               torch_threads=torch.get_num_threads(), world_size=world)
    return env


def _environment_changes(before: list[dict[str, Any] | None], now: dict[str, Any]) -> list[str]:
    """``"<key>: <earlier values> before, <value> now"`` for each entry of ``now`` that some
    recorded earlier session had otherwise (sessions not recorded are not compared)."""
    changes = []
    for key, value in now.items():
        earlier = []
        for env in before:
            if env is not None and env.get(key) != value and env.get(key) not in earlier:
                earlier.append(env.get(key))
        if earlier:
            changes.append(f"{key}: {' then '.join(map(repr, earlier))} before, {value!r} now")
    return changes


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _frozen_batchnorms(model: nn.Module, trained: set[str] | None) -> list[nn.Module]:
    """The BatchNorm layers of a partial selection none of whose parameters is trained
    (those without parameters included)."""
    if trained is None:
        return []
    frozen = []
    for prefix, module in model.named_modules():
        if isinstance(module, _BATCHNORMS):
            own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
            if not any(n in trained for n in own):
                frozen.append(module)
    return frozen


def fit(model: nn.Module, batches: BatchFn, n_train: int, config: TrainConfig, *,
        state_path: Path | str | None = None, resume: bool = True,
        val: Callable[[nn.Module], Evaluation] | None = None, val_size: int = 0,
        trainable: Callable[[str], bool] | Collection[str] | None = None,
        after_step: Callable[[nn.Module], None] | None = None,
        on_epoch: Callable[[EpochRecord, nn.Module], None] | None = None,
        loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        identity: Mapping[str, Any] | None = None,
        device: Device | str | torch.device = Device.CPU, checkpoint_every: int = 100,
        stop_after_steps: int | None = None, time_budget_s: float | None = None,
        progress: bool = True, desc: str = "train",
        return_interrupted: bool = False) -> FitResult:
    """Train (or continue training) ``model`` in place, validating after each epoch.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place; its initial weights are the caller's (seed them). Under a process
        group rank 0's initial weights are broadcast to every rank.
    batches : callable
        ``batches(Batch) -> (x, y)``: the tensors of the batch's shard (see :class:`Batch`;
        :func:`tensor_batches` for in-memory data). Moved to ``device`` by the loop. One
        with a ``len`` (as :func:`tensor_batches`') holds that many samples.
    n_train : int
        Training-set size; each epoch is a permutation of ``range(n_train)`` cut into
        ``n_train // config.batch_size`` global batches.
    config : TrainConfig
    state_path : Path, optional
        Resumable state, written (by rank 0) every ``checkpoint_every`` steps, at each
        epoch's end and when stopping early. None: nothing is saved.
    resume : bool
        Continue from ``state_path`` if it exists (else start over, replacing it). A state
        written in another environment (:attr:`History.environments`) resumes with an
        :class:`EnvironmentChangedWarning`: see Notes.
    val : callable, optional
        ``val(model) -> Evaluation`` after each epoch (rank 0 only; it should put the model
        in eval mode and back). ``val_size``, its sample count, feeds the time estimate.
    trainable : callable or collection of str, optional
        Parameter names to train (or a predicate on names); the others keep
        ``requires_grad=False`` for the run and are bit-identical after it, and a BatchNorm
        layer none of whose parameters is trained normalises with its running statistics and
        leaves them unchanged (a frozen backbone; a BatchNorm layer without parameters counts
        as frozen under a selection). None: every parameter.
    after_step : callable, optional
        ``after_step(model)`` after each optimizer update, before the step counts (pruning
        re-applies its masks here); a Ctrl-C waits for it. A hook with state (one that has
        ``state_dict`` and ``load_state_dict``, as
        :class:`qerror.compress.sparse.MagnitudePruner`) has it saved with the training
        state and restored on resuming.
    on_epoch : callable, optional
        ``on_epoch(record, model)`` after each epoch's record (rank 0 only).
    loss : callable, optional
        ``loss(output, y) -> scalar`` averaged over the samples; default cross-entropy with
        ``config.label_smoothing``. Training accuracy reads ``output``, or its last element
        when the model returns a sequence (e.g. the final exit).
    identity : mapping, optional
        What else determines the weights (a model recipe, data identity); recorded in the
        state, which then resumes only under the same identity.
    device : Device, str or torch.device
        ``cpu`` or ``cuda`` (``cuda:<local rank>`` under torchrun; see :func:`distributed`).
    checkpoint_every : int
    stop_after_steps : int, optional
        Stop once this many steps are done in total.
    time_budget_s : float, optional
        Stop before a step that would take the accumulated time of all sessions, steps and
        validations (:attr:`History.train_seconds`, rank 0's clock), past this. The step
        ahead is foreseen to take as long as the last one, and when it ends an epoch, its
        validation as long as the last validation (before any, ``val_size`` samples at a
        third of a step's time per sample).
    progress : bool
        A progress bar with the ETA (rank 0), and a time estimate after the first steps;
        both count the steps and validations up to ``stop_after_steps`` where that comes first.
    desc : str
        The progress bar's label.
    return_interrupted : bool
        On a Ctrl-C (KeyboardInterrupt), return a :class:`FitResult` with ``interrupted``
        instead of raising it again (``studies.train``, which says how to resume). Either
        way the state of the last completed step is saved first (when ``state_path``).

    Returns
    -------
    FitResult
        ``complete`` is false when the run stopped early (``stop_after_steps``,
        ``time_budget_s``) or was interrupted; the state at the last completed step is then
        saved. The history is complete on rank 0 (other ranks hold its steps but not its
        epochs).

    Raises
    ------
    KeyboardInterrupt
        Ctrl-C, after the state is saved, unless ``return_interrupted``: a caller that goes
        on with the model would use a half-trained network.
    TrainError
        A file at ``state_path`` that is not a training state (left as it is), or a damaged
        one (a torch archive cut short: deleting it starts over); fewer training samples
        than one batch, an ``n_train`` above the ``len`` of ``batches``, a global batch
        that the ranks cannot share equally, a ``checkpoint_every`` or ``stop_after_steps``
        below 1, an ``n_train`` or ``val_size`` below 0, a ``time_budget_s`` that is not a
        positive number (Python's or numpy's; a bool is none), one value per channel at a
        BatchNorm that trains (one image in the global batch where its map is 1x1), an
        empty or unknown parameter selection.
    TypeError
        ``n_train``, ``val_size``, ``checkpoint_every`` or ``stop_after_steps`` is not an
        integer (a bool, or a float even when integral), or ``resume``, ``progress`` or
        ``return_interrupted`` is not a bool (``'False'`` would read as true); refused
        before anything is done.
    ResumeError
        The state file was written by a different recipe, or holds the weights of another
        network or of another dtype (nothing of it is then loaded).
    DivergedError
        The loss or the weights became NaN or infinite; no state is saved past the last
        finite one. The weights are checked at each save, at each epoch's end (before
        validation and ``on_epoch``) and before returning, with or without ``state_path``.
    DeviceError
        CUDA asked for where there is none.

    Notes
    -----
    **Data parallelism.** With W ranks, rank r computes positions ``[r B/W, (r+1) B/W)`` of
    each global batch of B; DistributedDataParallel averages the ranks' gradients, which
    for a loss that is a mean over samples equals the gradient of the global batch. The
    trajectory is therefore the single-process one up to the order of float32 additions
    (the all-reduce sums W partial means instead of one mean over B). BatchNorm in training
    mode normalises by the statistics of the whole global batch
    (:func:`qerror.nn.parallel.global_batchnorm`, on CPU and GPU), not by each rank's B/W
    samples as plain DistributedDataParallel does, so it too follows the single-process
    run, running statistics included (they are broadcast from rank 0 at the end so all
    ranks end bit for bit equal).

    **Interruption.** A Ctrl-C during a step's forward or backward pass (where it usually
    lands) finds the BatchNorms' running statistics and the global random generator
    (dropout's) already moved by the unfinished step: both are put back as they were before
    it, so the saved state is the last completed step's and a resumed run repeats that
    step exactly. The optimizer update and what follows it hold a Ctrl-C until the step
    counts. Under torchrun Ctrl-C reaches every rank; rank 0 saves its state.

    **Bit for bit.** A resumed run repeats the uninterrupted one, and a rerun the first run,
    bit for bit only in the same environment: torch's thread count and version, the device,
    the CPU's vector kernels and the number of ranks change the order of float additions
    (:class:`TrainConfig`, Notes). Each session's environment is kept in the history
    (:attr:`History.environments`, saved with the state); resuming where any of it differs
    from an earlier session's warns (:class:`EnvironmentChangedWarning`) and goes on, as
    resuming on another machine may be what was meant.
    """
    try:  # an integer too small is a run that cannot start as asked, as the others
        n_train, val_size = check_count(n_train, "n_train"), check_count(val_size, "val_size")
        for name, value in (("checkpoint_every", checkpoint_every),
                            ("stop_after_steps", stop_after_steps)):
            if value is not None:
                check_count(value, name, 1)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    resume, progress = check_flag(resume, "resume"), check_flag(progress, "progress")
    return_interrupted = check_flag(return_interrupted, "return_interrupted")
    if time_budget_s is not None:
        # a bool is no number of seconds; numpy's reals are (np.float32 is no float to
        # isinstance)
        if not (is_real(time_budget_s) and math.isfinite(time_budget_s) and time_budget_s > 0):
            raise TrainError(f"time_budget_s must be a positive number of seconds (or None "
                             f"for no budget), got {time_budget_s!r}")
        time_budget_s = float(time_budget_s)
    state_path = None if state_path is None else Path(state_path)
    rank, world = parallel.world()
    main = rank == 0
    dev = resolve_device(device, _local_gpu() if dist.is_initialized() else 0)
    held = len(batches) if hasattr(batches, "__len__") else None
    if held is not None and n_train > held:
        # an epoch permutes range(n_train): indices past the data failed in a later step
        # with torch's bare IndexError, after the steps before it had run (and been saved)
        raise TrainError(f"n_train is {n_train} but the batch function holds {held} samples; "
                         f"pass n_train={held} (or fewer, to train on the first ones)")
    per_epoch = n_train // config.batch_size
    if per_epoch < 1:
        raise TrainError(f"batch size {config.batch_size} exceeds the {n_train} training "
                         "samples")
    if config.batch_size % world:
        raise TrainError(f"the global batch of {config.batch_size} cannot be shared equally by "
                         f"{world} ranks; pick a batch size that is a multiple of {world}")
    shard_size = config.batch_size // world
    shard = slice(rank * shard_size, (rank + 1) * shard_size)
    total = per_epoch * config.epochs
    chosen = _select(model, trainable)
    recipe = _recipe(config, identity, None if trainable is None else chosen, n_train)

    named = dict(model.named_parameters())
    requires = {n: p.requires_grad for n, p in named.items()}
    selected = set(chosen)
    frozen_bn = _frozen_batchnorms(model, None if trainable is None else selected)
    model.to(dev)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    for n, p in named.items():
        p.requires_grad_(n in selected)

    def train_mode() -> None:
        model.train()
        for m in frozen_bn:
            m.eval()

    try:
        with flush_denormal() if dev.type == "cpu" else contextlib.nullcontext():
            return _run(model, batches, n_train, config, recipe, state_path, resume, val,
                        val_size, {n: named[n] for n in chosen}, after_step, on_epoch, loss,
                        dev, checkpoint_every, stop_after_steps, time_budget_s,
                        progress and main, desc, rank, world, shard, per_epoch, total,
                        train_mode, return_interrupted)
    finally:
        for n, p in named.items():
            p.requires_grad_(requires[n])


def _local_gpu() -> int:
    """The GPU "cuda" means for this rank of a process group: LOCAL_RANK under torchrun (as
    in :func:`distributed`), else the current device its launcher set."""
    if any(k in os.environ for k in _TORCHRUN_ENV):
        return torchrun_ranks()[2]
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _run(model, batches, n_train, config, recipe, state_path, resume, val, val_size, params,
         after_step, on_epoch, loss_fn, dev, checkpoint_every, stop_after_steps,
         time_budget_s, progress, desc, rank, world, shard, per_epoch, total,
         train_mode, return_interrupted) -> FitResult:
    main = rank == 0
    train_mode()
    opt, sched = _optimizer(params, config, total)
    history, step = History(), 0
    loaded: dict | Exception | None = None
    if main and state_path is not None and (state_path.exists() or state_path.is_symlink()):
        read = _read_state(state_path)
        if isinstance(read, TrainError):  # not a state of ours, or a damaged one: kept
            loaded = read
        elif resume:
            try:
                loaded = _load_state(state_path, read, recipe, world)
            except ResumeError as exc:
                loaded = exc
        else:
            state_path.unlink()
    loaded = parallel.broadcast_object(loaded)
    if isinstance(loaded, Exception):
        raise loaded
    if loaded is not None:
        try:  # before anything is copied: a state of another network loads nothing
            check_state_dict(model, loaded["model"], f"the training state {state_path}")
        except StateDictMismatchError as exc:
            raise ResumeError(f"{exc} Delete {state_path} or start over without resuming"
                              ) from None
        # load_state_dict would cast another width of float (float32 into float64) and the
        # run would go on at another precision than the one that wrote the state
        own = model.state_dict()
        widths = [f"{k}: {v.dtype} saved, {own[k].dtype} now"
                  for k, v in loaded["model"].items() if v.dtype != own[k].dtype]
        if widths:
            raise ResumeError(
                f"the training state {state_path} holds tensors of another dtype than the "
                f"network's ({listing(widths, 3, '; ')}), so the run would go on at another "
                "precision than the one that wrote it; nothing was loaded. Build the network in "
                f"the dtype of the run that wrote the state, or delete {state_path} or start "
                "over without resuming")
        hook_state = loaded.get("after_step")
        stateful = callable(getattr(after_step, "load_state_dict", None))
        if hook_state is not None and not stateful:
            raise ResumeError(f"the training state {state_path} holds the state of an "
                              "after_step hook (e.g. a pruner's masks), and this run passes "
                              f"{'none' if after_step is None else 'one without state'}: pass "
                              "the same kind of hook to resume, or start over without resuming")
        if hook_state is not None:  # before the weights: a refused state leaves them as they are
            try:
                after_step.load_state_dict(hook_state)
            except (ValueError, TypeError, KeyError, RuntimeError) as exc:
                raise ResumeError(f"the training state {state_path} holds an after_step "
                                  f"hook's state this run's hook refuses ({exc}); pass the same "
                                  "hook as the run that wrote it, or start over without "
                                  "resuming") from exc
        model.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optimizer"])
        sched.load_state_dict(loaded["scheduler"])
        step = int(loaded["step"])
        history = _history(loaded["history"])
        if world == 1 and "rng" in loaded:  # the global generator, for dropout and the like
            torch.set_rng_state(loaded["rng"]["cpu"])
            if dev.type == "cuda" and "cuda" in loaded["rng"]:
                torch.cuda.set_rng_state(loaded["rng"]["cuda"], dev)
        if main:
            print(f"[train] resuming {state_path.name} at step {step} of {total}", flush=True)
    environment = _environment(dev, world)
    changes = _environment_changes(history.environments, environment)
    if main and changes:
        warnings.warn(
            f"resuming {state_path} in another environment than the session(s) that wrote it "
            f"({'; '.join(changes)}): the run goes on, but float round-off follows the "
            "environment, so its weights will not be the uninterrupted run's bit for bit. "
            "To continue it exactly, resume where it ran before (e.g. the same "
            "torch.set_num_threads or OMP_NUM_THREADS)", EnvironmentChangedWarning,
            stacklevel=3)
    history.environments.append(environment)
    history.sessions += 1
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    criterion = loss_fn or nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    order, order_epoch = None, -1
    session_times: list[float] = []
    # the steps this run will take: its ETA is that of stop_after_steps where that comes first
    bar_total = total if stop_after_steps is None else min(total, max(stop_after_steps, step))
    bar = tqdm(total=bar_total, initial=step, unit="step", desc=desc, disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    saved = step
    checked = step  # the weights of this step are known finite (a loaded state is)

    def diverged(what: str, at_step: int) -> DivergedError:
        kept = (f"; the state of step {saved} stays in {state_path}"
                if state_path is not None and state_path.is_file() else "")
        epoch = (at_step - 1) // per_epoch + 1
        return DivergedError(
            f"training diverged: {what} at step {at_step} of {total} (epoch {epoch} of "
            f"{config.epochs}, peak learning rate {config.lr:g}). No checkpoint was "
            f"written{kept}. Start over with a lower learning rate, without resuming.",
            step=at_step, epoch=epoch)

    def check_finite() -> None:
        # Every rank checks (the weights are the same), so all stop together.
        nonlocal checked
        if checked == step:
            return
        bad = non_finite_tensors(model.state_dict())
        if bad:
            raise diverged(f"the weights became non-finite ({listing(bad, 3, '; ')})", step)
        checked = step

    def save() -> None:
        nonlocal saved
        if state_path is None:
            return
        if saved != step or (main and not state_path.is_file()):
            check_finite()
            if main:
                _save_state(state_path, recipe, step, model, opt, sched, history, dev,
                            after_step)
            saved = step

    def record_epoch_if_due() -> None:
        # Also on resuming, in case the run was interrupted during an epoch's validation.
        if main and step and step % per_epoch == 0 and len(history.epochs) < step // per_epoch:
            epoch = step // per_epoch - 1
            t1 = time.perf_counter()
            evaluation = val(model) if val is not None else None
            train_mode()
            val_s = time.perf_counter() - t1
            history.train_seconds += val_s
            if val is not None:
                history.val_seconds.append(val_s)
            history.epochs.append(_epoch_record(history, epoch, step, evaluation))
            e = history.epochs[-1]
            bar.write(f"[train] epoch {epoch + 1}/{config.epochs}: train loss "
                      f"{e.train_loss:.4f}" + ("" if val is None else
                                               f", val accuracy {e.val_accuracy:.4f} "
                                               f"[{e.val_ci_low:.4f}, {e.val_ci_high:.4f}]"))
            if on_epoch is not None:
                on_epoch(e, model)

    def agreed_stop(local: bool) -> bool:
        if world == 1:
            return local
        flag = torch.tensor([float(local and main)], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    interrupted = False
    before = None
    try:
        record_epoch_if_due()
        while step < total:
            if stop_after_steps is not None and step >= stop_after_steps:
                break
            if time_budget_s is not None:
                last_s = history.steps[-1].seconds if history.steps else 0.0
                # the step ahead, and the validation after it when it ends an epoch
                ahead = last_s + (_validation_ahead(history, config, val_size, last_s)
                                  if val is not None and (step + 1) % per_epoch == 0 else 0.0)
                if agreed_stop(history.train_seconds + ahead > time_budget_s):
                    if main:  # tqdm.write prints whatever the bar's disable says
                        bar.write(f"[train] the time budget of {_duration(time_budget_s)} is "
                                  f"spent at step {step} of {total}")
                    break
            t0 = time.perf_counter()
            # what an unfinished step moves before its update: put back on a Ctrl-C
            before = _step_snapshot(model, dev)
            epoch, i = divmod(step, per_epoch)
            if epoch != order_epoch:
                order = np.random.default_rng([config.seed, _ORDER_STREAM, epoch]) \
                    .permutation(n_train)
                order_epoch = epoch
            idx = order[i * config.batch_size:(i + 1) * config.batch_size]
            aug = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [config.seed, _AUGMENT_STREAM, epoch, i]).generate_state(1)[0]))
            x, y = batches(Batch(epoch, i, step, idx, shard, aug))
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            lr = sched.get_last_lr()[0]
            opt.zero_grad(set_to_none=True)
            train_mode()
            try:
                # every rank runs this forward: its BatchNorms may meet in collectives (not
                # in validation or on_epoch, which rank 0 runs alone)
                with parallel.global_batchnorm(model):
                    out = net(x)
            except ValueError as exc:  # torch's words for a BatchNorm without statistics
                if "more than 1 value per channel when training" not in str(exc):
                    raise
                raise TrainError(
                    f"a BatchNorm layer that trains got one value per channel at step "
                    f"{step + 1} ({len(x) * world} image(s) in the global batch and a 1x1 "
                    "map or a vector there), which has no batch statistics; pick a batch "
                    f"size of at least {max(2, world)}") from exc
            loss = criterion(out, y)
            logits = out[-1] if isinstance(out, list | tuple) else out
            correct = (logits.argmax(1) == y).sum()
            if world == 1:
                loss_value, n_correct = loss.item(), int(correct)
            else:
                # The global batch's mean loss and correct count, the same on every rank, so
                # a non-finite loss stops all ranks at once.
                both = torch.stack([loss.detach().double(), correct.double()])
                dist.all_reduce(both)
                loss_value, n_correct = float(both[0]) / world, int(both[1])
            if not math.isfinite(loss_value):
                raise diverged(f"the loss became {loss_value}", step + 1)
            loss.backward()
            with sigint_held():
                opt.step()
                if after_step is not None:
                    after_step(model)
                sched.step()
                step += 1
                before = None
                dt = time.perf_counter() - t0
                history.train_seconds += dt
                history.steps.append(StepRecord(step, epoch, lr, loss_value, n_correct,
                                                config.batch_size, dt))
            session_times.append(dt)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.3g}", refresh=False)
            if progress and len(session_times) == _ESTIMATE_STEPS + 1 and step < bar_total:
                # the steps and validations up to where this run stops, as the bar counts
                _print_estimate(bar, config, session_times[1:], bar_total - step,
                                bar_total // per_epoch - epoch, val_size, time_budget_s,
                                history.train_seconds)
            if step % per_epoch == 0:  # neither validation nor on_epoch sees non-finite weights
                check_finite()
            record_epoch_if_due()
            if step % per_epoch == 0 or step % checkpoint_every == 0:
                save()
    except KeyboardInterrupt:
        interrupted = True
        if before is not None:  # in a step that did not count: as it was before it
            _restore_step(model, dev, before)
    finally:
        bar.close()
    try:
        with sigint_held():  # the last state is written whole before a Ctrl-C is taken
            check_finite()  # with no state_path too: never a network with non-finite weights
            save()
    except KeyboardInterrupt:
        interrupted = True
    if interrupted and not return_interrupted:
        raise KeyboardInterrupt
    if world > 1 and not interrupted:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    return FitResult(model, history, step, total, interrupted)


def _step_snapshot(model: nn.Module, dev: torch.device) -> tuple:
    """The buffers (BatchNorms' running statistics) and the global random generators a
    training step's forward pass moves before its update."""
    rng = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
    return [b.detach().clone() for b in model.buffers()], rng, cuda


def _restore_step(model: nn.Module, dev: torch.device, snapshot: tuple) -> None:
    buffers, rng, cuda = snapshot
    with torch.no_grad():
        for b, old in zip(model.buffers(), buffers):
            b.copy_(old)
    torch.set_rng_state(rng)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, dev)


def _save_state(path: Path, recipe: dict, step: int, model, opt, sched, history: History,
                dev: torch.device, hook=None) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dev)
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "recipe": recipe,
             "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": rng,
             "history": {"steps": [asdict(r) for r in history.steps],
                         "epochs": [asdict(r) for r in history.epochs],
                         "train_seconds": history.train_seconds,
                         "sessions": history.sessions,
                         "environments": history.environments,
                         "val_seconds": history.val_seconds}}
    if callable(getattr(hook, "state_dict", None)):
        state["after_step"] = hook.state_dict()
    atomic_write(path, lambda tmp: torch_save(state, tmp, f"the training state {path}"))


def _epoch_record(history: History, epoch: int, step: int,
                  evaluation: Evaluation | None) -> EpochRecord:
    rows = [r for r in history.steps if r.epoch == epoch]
    if evaluation is None:
        val = (math.nan,) * 4
    else:
        ci = wilson_ci(evaluation.correct, evaluation.n).ci
        val = (evaluation.loss, evaluation.correct / evaluation.n, float(ci[0]), float(ci[1]))
    return EpochRecord(epoch + 1, step, float(np.mean([r.loss for r in rows])),
                       sum(r.correct for r in rows) / sum(r.batch for r in rows), *val,
                       history.train_seconds)


def _validation_estimate(n_val: int, config: TrainConfig, step_s: float) -> float:
    """Seconds of a validation of ``n_val`` samples, from a training step's: a forward pass
    costs about a third of a training step per sample."""
    return n_val / config.batch_size * step_s / 3


def _validation_ahead(history: History, config: TrainConfig, n_val: int,
                      step_s: float) -> float:
    """The seconds the time budget foresees for the next validation: the last one's, or
    before any was measured the estimate from ``n_val`` (0 when it is not given)."""
    if history.val_seconds:
        return history.val_seconds[-1]
    return _validation_estimate(n_val, config, step_s)


def _duration(seconds: float) -> str:
    """``seconds`` for a message: in minutes from one minute on, else in seconds (three
    significant digits), so that a time above 0 never reads as 0."""
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.3g} s"


def _print_estimate(bar, config: TrainConfig, times: list[float], steps_left: int,
                    epochs_left: int, n_val: int, budget_s: float | None,
                    spent_s: float) -> None:
    step_s = float(np.median(times))
    val_s = epochs_left * _validation_estimate(n_val, config, step_s)
    total_s = steps_left * step_s + val_s
    msg = (f"[train] {step_s:.2f} s/step over {len(times)} steps: the {steps_left} steps left "
           f"take about {_duration(steps_left * step_s)}, plus {_duration(val_s)} of "
           f"validation, about {_duration(spent_s + total_s)} in all")
    if budget_s is not None and spent_s + total_s > budget_s:
        msg += (f"; that exceeds the budget of {_duration(budget_s)}, so the run will stop at "
                "the budget with its state saved (raise the budget or lower the epochs)")
    bar.write(msg)


__all__ = [
    "Batch", "BatchFn", "Device", "DeviceError", "DivergedError", "EnvironmentChangedWarning",
    "EpochRecord", "Evaluation", "FitResult", "History", "Placement", "ResumeError", "Schedule",
    "StepRecord", "TrainConfig", "TrainError", "disable_tf32", "distributed", "fit",
    "resolve_device", "tensor_batches", "torchrun_ranks",
]
