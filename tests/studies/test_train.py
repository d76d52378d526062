"""The training study on synthetic IDX files: end to end, learning, resuming, stopping."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qerror import data, wilson_ci
from qerror.files import name_max
from qerror.nn import models, training
from studies import _common, train
from studies._common import REPO, sha256_file

SMOKE = ["--smoke", "--arch", "resnet18"]


def learnable_images(rng, n):
    """Ten texture classes (stripes, checkerboards, a blob, nothing) in noise.

    Textures are unchanged in kind by the study's shifts and flips, so the labels stay
    learnable under augmentation, unlike random labels or position-coded classes.
    """
    yy, xx = np.mgrid[0:20, 0:20]
    patterns = ([(yy // p) % 2 for p in (1, 2, 4)] + [(xx // p) % 2 for p in (1, 2, 4)]
                + [(yy // p + xx // p) % 2 for p in (1, 3)]
                + [np.ones((20, 20), int), np.zeros((20, 20), int)])
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28))
    images[:, 4:24, 4:24] += 200 * np.stack(patterns)[labels]
    return images.astype(np.uint8), labels.astype(np.uint8)


# The synthetic data's split sizes, declared to qerror.data (which checks every file's).
SYNTHETIC_SIZES = {"train": 400, "test": 100}
# `python -m studies.train` in a child process that first declares them.
TRAIN_CLI = [sys.executable, "-c",
             ("import runpy; from qerror import data; "
              f"data.SIZES.update({SYNTHETIC_SIZES!r}); "
              "runpy.run_module('studies.train', run_name='__main__', alter_sys=True)")]


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm")
    rng = np.random.default_rng(0)
    for split, n in SYNTHETIC_SIZES.items():
        images, labels = learnable_images(rng, n)
        data.write_idx(root / f"{data.FILES[split][0]}.gz", images)
        data.write_idx(root / f"{data.FILES[split][1]}.gz", labels)
    return root


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Only the test's files are found, and no real cache is touched."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(data, "SIZES", SYNTHETIC_SIZES)


@pytest.fixture(scope="module")
def reference_run(idx_root, tmp_path_factory):
    """One uninterrupted smoke run of the training CLI (``python -m studies.train``, through
    runpy) in a child process."""
    tmp = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "xdg")}
    env.pop(data.ENV_VAR, None)
    out = tmp / "run"
    proc = subprocess.run([*TRAIN_CLI, *SMOKE, "--data-root",
                           str(idx_root), "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    checkpoint = tmp / "xdg" / "qerror" / "checkpoints" / "fashion-resnet18-imagenet-smoke.pt"
    return proc, out, checkpoint


def test_smoke_cli_end_to_end(reference_run):
    proc, out, checkpoint = reference_run
    assert proc.returncode == 0, proc.stderr
    assert "s/step over 3 steps" in proc.stdout  # the time estimate, above the progress bar
    assert "test accuracy" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    expected = {"epochs.csv", "steps.csv", "summary.json", "training_curve.pdf",
                "training_curve.png", "step_seconds.csv", "timing.json"}
    assert set(manifest["outputs"]) == expected
    assert manifest["timing_outputs"] == ["step_seconds.csv", "timing.json"]
    assert all(sha256_file(out / name) == h for name, h in manifest["outputs"].items())
    assert not list(out.parent.glob(".run.partial-*"))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["sessions"], summary["test_n"]) == (16, 1, 100)
    # the interval's level is recorded with it (the README names it from the run)
    assert summary["test_ci_alpha"] == train.TEST_ALPHA == 0.05
    k = round(summary["test_accuracy"] * summary["test_n"])
    assert summary["test_ci"] == list(wilson_ci(k, 100, summary["test_ci_alpha"]).ci)
    loaded = models.load_checkpoint(checkpoint, expected_arch="resnet18")
    assert loaded.info.sha256 == manifest["model"]["sha256"]
    assert loaded.info.metrics["test_accuracy"] == summary["test_accuracy"]
    assert loaded.info.config["recipe"]["train_images"] == 256
    # The finished run leaves no state behind, so the next run starts afresh.
    assert not checkpoint.with_name(checkpoint.name + ".train-state.pt").exists()
    epochs = pd.read_csv(out / "epochs.csv")
    assert epochs["epoch"].tolist() == [1, 2] and epochs["step"].tolist() == [8, 16]


def test_training_lowers_the_loss(reference_run):
    _, out, _ = reference_run
    steps = pd.read_csv(out / "steps.csv")
    assert steps["step"].tolist() == list(range(1, 17))
    first, last = steps["loss"].iloc[:4].mean(), steps["loss"].iloc[-4:].mean()
    assert last < first, (first, last)
    # Learning, not noise: validation accuracy is above the 1/10 of guessing, at alpha 0.05.
    epochs = pd.read_csv(out / "epochs.csv")
    n = 64
    correct = round(epochs["val_accuracy"].iloc[-1] * n)
    assert wilson_ci(correct, n).ci[0] > 0.1


def _main(idx_root, tmp_path, *extra):
    return train.main([*SMOKE, "--data-root", str(idx_root), "--out", str(tmp_path / "run"),
                       "--checkpoint", str(tmp_path / "ckpt.pt"), "--no-progress", *extra])


def _state_step(tmp_path):
    return torch.load(tmp_path / "ckpt.pt.train-state.pt", weights_only=True)["step"]


def test_interrupted_run_resumes_exactly(reference_run, idx_root, tmp_path, capsys):
    assert _main(idx_root, tmp_path, "--stop-after-steps", "5") == train.EXIT_INCOMPLETE
    assert _state_step(tmp_path) == 5
    assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt.pt").exists()
    capsys.readouterr()
    assert _main(idx_root, tmp_path) == 0
    assert "resuming ckpt.pt.train-state.pt at step 5 of 16" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["steps"], summary["sessions"]) == (16, 2)
    # Order and augmentation depend on (seed, epoch, step) only, so the resumed run repeats
    # the uninterrupted one step for step.
    _, ref_out, ref_checkpoint = reference_run
    ours = pd.read_csv(tmp_path / "run" / "steps.csv")
    ref = pd.read_csv(ref_out / "steps.csv")
    assert ours["step"].tolist() == ref["step"].tolist()
    np.testing.assert_array_equal(ours["loss"], ref["loss"])
    a = models.load_checkpoint(tmp_path / "ckpt.pt").model.state_dict()
    b = models.load_checkpoint(ref_checkpoint).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_recipe_and_no_resume_starts_over(idx_root, tmp_path, capsys):
    assert _main(idx_root, tmp_path, "--stop-after-steps", "3") == train.EXIT_INCOMPLETE
    assert _main(idx_root, tmp_path, "--epochs", "3") == 2
    assert "different recipe (epochs: 2 saved, 3 now)" in capsys.readouterr().err
    assert _main(idx_root, tmp_path, "--no-resume", "--stop-after-steps", "1") \
        == train.EXIT_INCOMPLETE
    assert _state_step(tmp_path) == 1


def test_a_users_files_where_the_state_and_checkpoint_would_go_are_never_touched(
        idx_root, tmp_path, capsys):
    """A file of someone else's at the state's path is refused, resuming or not (--no-resume
    once deleted it); so is a model.pt whose model.pt.json is not a qerror sidecar, even
    with --force (it once counted as a checkpoint and was overwritten)."""
    state = tmp_path / "ckpt.pt.train-state.pt"
    state.write_bytes(b"my own notes")
    for extra in ((), ("--no-resume",)):
        assert _main(idx_root, tmp_path, *extra) == 2
        err = capsys.readouterr().err
        assert "is left as it is" in err and "Traceback" not in err
        assert state.read_bytes() == b"my own notes"
    state.unlink()
    (tmp_path / "ckpt.pt").write_bytes(b"weights")
    (tmp_path / "ckpt.pt.json").write_text('{"note": "mine"}')
    assert _main(idx_root, tmp_path, "--force") == 2
    assert "is not a qerror checkpoint" in capsys.readouterr().err
    assert (tmp_path / "ckpt.pt").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt.pt.json"]


def test_a_checkpoint_inside_out_is_refused_before_training(idx_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main([*SMOKE, "--data-root", str(idx_root), "--out", str(out),
                       "--checkpoint", str(out / "model.pt"), "--no-progress"])
    assert code == 2
    assert "lies inside --out" in capsys.readouterr().err
    assert not out.exists()


def test_a_checkpoint_name_with_no_room_for_its_state_is_refused_before_training(
        idx_root, tmp_path, capsys):
    """The training state is NAME.train-state.pt beside the checkpoint, 15 bytes longer: a
    legal --checkpoint that leaves no room for it trained until its first state save, which
    failed with a raw "File name too long". It is refused before any data is read."""
    limit = name_max(tmp_path)
    room = limit - len(".train-state.pt")
    checkpoint = tmp_path / ("c" * (room + 1 - len(".pt")) + ".pt")
    code = train.main([*SMOKE, "--data-root", str(idx_root), "--out", str(tmp_path / "run"),
                       "--checkpoint", str(checkpoint), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"its name is {room + 1} bytes" in err and f"over the {limit} bytes" in err
    assert f"pass a --checkpoint whose name is at most {room} bytes" in err
    assert not list(tmp_path.iterdir())


def test_resume_refuses_other_training_images(idx_root, tmp_path, capsys):
    """A state resumes only on the images it was trained on: another folder with other
    labels is refused, not trained on and recorded as if it had been there throughout."""
    other = tmp_path / "other-data"
    other.mkdir()
    for f in idx_root.iterdir():
        shutil.copyfile(f, other / f.name)
    labels = data.read_idx(idx_root / f"{data.FILES['train'][1]}.gz")
    data.write_idx(other / f"{data.FILES['train'][1]}.gz", ((labels + 1) % 10).astype(np.uint8))
    assert _main(idx_root, tmp_path, "--stop-after-steps", "3") == train.EXIT_INCOMPLETE
    capsys.readouterr()
    assert train.main([*SMOKE, "--data-root", str(other), "--out", str(tmp_path / "run"),
                       "--checkpoint", str(tmp_path / "ckpt.pt"), "--no-progress"]) == 2
    assert "different recipe (data:" in capsys.readouterr().err
    assert _state_step(tmp_path) == 3 and not (tmp_path / "ckpt.pt").exists()


def test_time_budget_stops_with_the_state_saved(idx_root, tmp_path, capsys):
    # A budget far below one step's time: the run stops after its first step.
    assert _main(idx_root, tmp_path, "--time-budget-min", "1e-6") == train.EXIT_INCOMPLETE
    assert _state_step(tmp_path) == 1
    out = capsys.readouterr().out
    assert "run the same command with a larger --time-budget-min" in out
    # in seconds below a minute: it read "0.0 min"
    assert "[train] the time budget of 6e-05 s is spent at step 1 of 16" in out


def test_augmentation_is_a_background_filled_shift_and_a_flip():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.arange(6)
    plain, y = train.batch_tensors(images, labels)
    assert torch.equal(plain, data.to_tensor(images)) and y.tolist() == labels.tolist()
    gen = torch.Generator().manual_seed(0)
    aug, _ = train.batch_tensors(images, labels, crop_pad=2, flip=True, generator=gen)
    background = -data.MEAN / data.STD
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2), value=background)
    for i in range(6):
        candidates = [padded[i, :, r:r + 32, c:c + 32] for r in range(5) for c in range(5)]
        candidates += [t.flip(-1) for t in candidates]
        assert any(torch.equal(aug[i], t) for t in candidates)


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--arch", "--stem", "--epochs", "--resume", "--time-budget-min", "--smoke",
                   "--device"):
        assert option in help_text
    with pytest.raises(SystemExit) as info:
        train.main(["--epochs", "0"])
    assert info.value.code == 2
    assert "argument --epochs: must be at least 1, got 0" in capsys.readouterr().err


def test_the_help_of_force_names_the_checkpoint_it_replaces():
    """--force replaces a qerror checkpoint at --checkpoint (or the cache's) as well as a
    previous run at --out (probe_force_train.log: with a new --out, the checkpoint's sha256
    went from 29a97219... to 6d9a28f9...), but its help said it replaced a previous run at
    --out and "never anything else"."""
    text = " ".join(train.build_parser().format_help().split())
    force = text[text.index("--force replace"):]
    force = force[:force.index("(never anything else)")]
    assert "a qerror checkpoint at --checkpoint (default: the cache's)" in force


def test_get_or_train_baseline_trains_only_when_missing(tmp_path, monkeypatch):
    """The studies, not the library, decide to train: the training study runs in-process
    with the arguments given, once; a failed run says how to resume."""
    path = models.default_checkpoint_path("resnet18")
    with pytest.raises(models.CheckpointNotFoundError, match="python -m studies.train"):
        train.get_or_train_baseline("resnet18", train_if_missing=False)
    calls = []

    def fake_main(argv):
        calls.append(argv)
        models.save_checkpoint(models.fashion_resnet("resnet18"),
                               argv[argv.index("--checkpoint") + 1], arch="resnet18",
                               stem="imagenet", config={}, metrics={"test_accuracy": 0.5})
        return 0

    monkeypatch.setattr(train, "main", fake_main)
    got = train.get_or_train_baseline("resnet18", train_if_missing=True,
                                      data_root=tmp_path / "fm", train_args=("--seed", "1"))
    # its run folder beside the checkpoint: the trainer's default --out may hold a user's
    # own training run, which --force would replace
    assert calls == [["--arch", "resnet18", "--stem", "imagenet", "--checkpoint", str(path),
                      "--out", str(path.with_name(path.name + ".run")), "--force",
                      "--data-root", str(tmp_path / "fm"), "--seed", "1"]]
    assert got.info.path == path
    assert train.get_or_train_baseline("resnet18", train_if_missing=True).info.sha256 == \
        got.info.sha256
    assert len(calls) == 1  # cached: not trained again
    monkeypatch.setattr(train, "main", lambda argv: 3)
    with pytest.raises(models.CheckpointError, match="stopped early .*to continue it, run"):
        train.get_or_train_baseline("resnet50", train_if_missing=True)
    monkeypatch.setattr(train, "main", lambda argv: 2)  # e.g. no data: nothing to resume
    with pytest.raises(models.CheckpointError, match="failed with exit code 2 for the reason"):
        train.get_or_train_baseline("resnet50", train_if_missing=True)
    # a Ctrl-C in the training is the calling study's too: it exits as interrupted (130),
    # not as refused (2)
    monkeypatch.setattr(train, "main", lambda argv: train.EXIT_INTERRUPTED)
    with pytest.raises(KeyboardInterrupt):
        train.get_or_train_baseline("resnet50", train_if_missing=True)
    study = _common.study_main(
        lambda argv: train.get_or_train_baseline("resnet50", train_if_missing=True) and 0)
    assert study([]) == train.EXIT_INTERRUPTED


def test_a_baseline_checkpoint_name_with_no_room_for_its_run_is_refused_as_given(
        tmp_path, monkeypatch):
    """get_or_train_baseline trains into the run folder NAME.run beside the checkpoint,
    staged as .NAME.run.partial-PID: a checkpoint name that left no room for it was refused
    by the training run as an --out the caller never passed ("pass an --out whose name is
    at most ..."). It is refused before training, naming the checkpoint, the limit and the
    longest checkpoint name that works; that one is trained."""
    limit = name_max(tmp_path)
    room = limit - len(".run") - len("..partial-") - _common.PID_DIGITS
    calls = []
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or 2)
    path = tmp_path / ("c" * (room + 1 - len(".pt")) + ".pt")
    with pytest.raises(models.CheckpointError) as info:
        train.get_or_train_baseline("resnet18", train_if_missing=True, path=path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path}: its name is {room + 1} bytes")
    assert f"over the {limit} bytes" in message and message.endswith(
        f"pass a checkpoint path whose name is at most {room} bytes")
    assert "--out" not in message and not calls
    path = tmp_path / ("c" * (room - len(".pt")) + ".pt")
    with pytest.raises(models.CheckpointError, match="failed with exit code 2"):
        train.get_or_train_baseline("resnet18", train_if_missing=True, path=path)
    assert calls[0][calls[0].index("--out") + 1] == str(path) + ".run"
    assert _common.out_name_room(Path(str(path) + ".run")) == (limit, room + len(".run"))


def test_a_baseline_stopped_by_a_limit_is_continued_by_a_command_without_it(monkeypatch):
    """The limits count every session, so the same command would stop again at once: the
    command given to continue leaves them out, in each of argparse's spellings."""
    monkeypatch.setattr(train, "main", lambda argv: train.EXIT_INCOMPLETE)
    limits = ("--smoke", "--stop-after-steps", "2", "--no-progress", "--time-budget-min=5",
              "--seed", "3", "--stop-after", "4", "--time-b", "1")
    with pytest.raises(models.CheckpointError) as info:
        train.get_or_train_baseline("resnet18", train_if_missing=True, train_args=limits)
    message = str(info.value)
    assert "stopped early (exit code 3: --stop-after-steps or --time-budget-min)" in message
    assert message.endswith(" --force --smoke --no-progress --seed 3")
    assert "--stop-after" not in message.split(": ", 2)[-1] and "--time-b" not in \
        message.split(": ", 2)[-1]


@pytest.mark.parametrize("code", [train.EXIT_INTERRUPTED, 2, train.EXIT_INCOMPLETE])
def test_the_command_to_train_again_works_as_written_with_a_space_in_a_path(
        code, tmp_path, monkeypatch, capsys):
    """The interrupted and the failed baseline training said 'run the same command' with the
    arguments joined by spaces: a cache (or --data-root) path with a space in it became two
    words of the shell's, and the command named another checkpoint."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "My Cache"))
    given = []
    monkeypatch.setattr(train, "main", lambda argv: given.append(argv) or code)
    with pytest.raises((KeyboardInterrupt, models.CheckpointError)) as info:
        train.get_or_train_baseline("resnet18", train_if_missing=True,
                                    data_root=tmp_path / "fashion mnist")
    said = capsys.readouterr().err + str(info.value)
    command = said.rstrip().rsplit(": ", 1)[-1]
    assert shlex.split(command) == ["python", "-m", "studies.train", *given[0]]
    assert str(tmp_path / "My Cache") in given[0][given[0].index("--checkpoint") + 1]


# --------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("option, value, message", [
    ("--lr", "nan", "argument --lr: must be a finite number, got 'nan'"),
    ("--lr", "-1", "argument --lr: must be above 0, got '-1'"),
    ("--lr", "inf", "argument --lr: must be a finite number, got 'inf'"),
    ("--lr", "0", "argument --lr: must be above 0, got '0'"),
    ("--epochs", "0", "argument --epochs: must be at least 1, got 0"),
    ("--batch-size", "-4", "argument --batch-size: must be at least 1, got -4"),
    ("--checkpoint-every", "0", "argument --checkpoint-every: must be at least 1, got 0"),
    ("--stop-after-steps", "0", "argument --stop-after-steps: must be at least 1, got 0"),
    ("--time-budget-min", "nan", "--time-budget-min: must be a finite number, got 'nan'"),
    ("--time-budget-min", "inf", "(leave it out for no limit)"),
    # finite minutes whose seconds overflow: refused after the data were read, in the words
    # of fit's time_budget_s (got inf), an argument the command never names
    ("--time-budget-min", "1e308", "argument --time-budget-min: must be at most 2.99616e+306 "
                                   "minutes, whose seconds are a finite number, got '1e308'"),
])
def test_bad_numbers_are_refused_before_any_work(option, value, message, idx_root, tmp_path,
                                                 capsys):
    with pytest.raises(SystemExit) as info:
        _main(idx_root, tmp_path, option, value)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the cache folder


@pytest.mark.parametrize("value, example", [(".", "model.pt"), ("", "model.pt"),
                                            ("/", "/model.pt"), ("sub/..", "sub/../model.pt")])
def test_a_checkpoint_that_names_no_file_is_refused_before_any_work(value, example, idx_root,
                                                                    tmp_path, monkeypatch,
                                                                    capsys):
    """'.', '' and '/' stopped in pathlib's "PosixPath('.') has an empty name" (a traceback);
    'sub/..' trained, left its state as sub/...train-state.pt, and was refused after."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        _main(idx_root, tmp_path, "--checkpoint", value)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --checkpoint: must name a file, e.g. {example}, got {value!r}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu_is_refused_before_any_work(idx_root, tmp_path, capsys):
    assert _main(idx_root, tmp_path, "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "device cuda was asked for" in err and "--device cpu" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["missing folder", "2 of 4 files", "corrupt gz"])
def test_bad_data_root_exits_2_with_the_message(case, idx_root, tmp_path, capsys):
    root = tmp_path / "fm"
    if case != "missing folder":
        root.mkdir()
        for f in idx_root.iterdir():
            if case == "corrupt gz" or f.name.startswith("train"):
                (root / f.name).write_bytes(f.read_bytes())
    if case == "corrupt gz":
        path = root / f"{data.FILES['test'][0]}.gz"
        path.write_bytes(path.read_bytes()[:-300])
    expected = {"missing folder": "fm does not exist",
                "2 of 4 files": "lacks 2 of the four Fashion-MNIST IDX files",
                "corrupt gz": "t10k-images-idx3-ubyte.gz is truncated or corrupt"}[case]
    assert _main(root, tmp_path) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "run").exists()


def _nan_from_call(monkeypatch, first):
    """batch_tensors returns NaN images from its ``first``-th call on: a loss that diverges."""
    real, calls = train.batch_tensors, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        x, y = real(*args, **kwargs)
        return (x * float("nan") if len(calls) >= first else x), y

    monkeypatch.setattr(train, "batch_tensors", poisoned)


def test_diverging_loss_stops_with_the_step_and_writes_no_checkpoint(idx_root, tmp_path,
                                                                     monkeypatch, capsys):
    _nan_from_call(monkeypatch, first=4)
    assert _main(idx_root, tmp_path) == 2
    err = capsys.readouterr().err
    assert "training diverged: the loss became nan at step 4 of 16 (epoch 1 of 2" in err
    assert "No checkpoint was written" in err and "lower --lr" in err
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "run").exists()


def test_diverged_weights_are_never_saved(idx_root, tmp_path, monkeypatch, capsys):
    """Weights that turn NaN in the update after a finite loss are caught before the
    state (and so the checkpoint) is written; the state of the last good save stays."""
    real_step = torch.optim.SGD.step

    def poisoning_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        if train_step[0] == 12:  # the update of step 12, a save point
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        train_step[0] += 1
        return result

    train_step = [1]
    monkeypatch.setattr(torch.optim.SGD, "step", poisoning_step)
    assert _main(idx_root, tmp_path, "--checkpoint-every", "4") == 2
    err = capsys.readouterr().err
    assert "the weights became non-finite (" in err and "NaN" in err
    assert "the state of step 8 stays in" in err
    assert _state_step(tmp_path) == 8 and not (tmp_path / "ckpt.pt").exists()


def _interrupt(monkeypatch, target, name, on_call):
    real, calls = getattr(target, name), []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, interrupting)


def _same_as_reference(reference_run, tmp_path):
    _, ref_out, ref_checkpoint = reference_run
    for csv in ("steps.csv", "epochs.csv"):
        ours, ref = pd.read_csv(tmp_path / "run" / csv), pd.read_csv(ref_out / csv)
        for column in ("step", "loss") if csv == "steps.csv" else ("epoch", "val_accuracy"):
            np.testing.assert_array_equal(ours[column], ref[column])
    a = models.load_checkpoint(tmp_path / "ckpt.pt").model.state_dict()
    b = models.load_checkpoint(ref_checkpoint).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_the_state_and_the_same_command_resumes(reference_run, idx_root,
                                                             tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        _interrupt(m, train, "batch_tensors", on_call=6)  # while preparing step 6
        assert _main(idx_root, tmp_path) == train.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted at step 5 of 16" in err and "Traceback" not in err
    assert "run the same command: python -m studies.train --smoke --arch resnet18" in err
    assert _state_step(tmp_path) == 5 and not (tmp_path / "ckpt.pt").exists()
    assert _main(idx_root, tmp_path) == 0
    assert "resuming ckpt.pt.train-state.pt at step 5 of 16" in capsys.readouterr().out
    _same_as_reference(reference_run, tmp_path)


def test_ctrl_c_during_validation_redoes_it_on_resuming(reference_run, idx_root, tmp_path,
                                                        monkeypatch):
    with monkeypatch.context() as m:
        _interrupt(m, train, "evaluate", on_call=1)  # validating after step 8
        assert _main(idx_root, tmp_path) == train.EXIT_INTERRUPTED
    assert _state_step(tmp_path) == 8
    assert _main(idx_root, tmp_path) == 0
    _same_as_reference(reference_run, tmp_path)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread()
                    or signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="SIGINT is held only in the main thread under Python's own handler")
def test_a_real_sigint_inside_an_update_lands_after_it(idx_root, tmp_path, monkeypatch,
                                                       capsys):
    """The signal arrives between the optimizer's update and the step counter's: the
    update completes and is counted, so the saved state is consistent."""
    real_step = torch.optim.lr_scheduler.OneCycleLR.step
    calls = []

    def step_with_sigint(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the constructor steps once; this is the third update
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.lr_scheduler.OneCycleLR, "step", step_with_sigint)
    assert _main(idx_root, tmp_path) == train.EXIT_INTERRUPTED
    assert "interrupted at step 3 of 16" in capsys.readouterr().err
    state = torch.load(tmp_path / "ckpt.pt.train-state.pt", weights_only=True)
    assert state["step"] == 3 and len(state["history"]["steps"]) == 3
    assert state["scheduler"]["last_epoch"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_rerun_writes_the_same_bytes_but_for_its_timing_files(idx_root, tmp_path):
    """Same command, same seed: every output but the named timing files is the same bytes
    (the trained weights too); replacing the first run and its checkpoint needs --force."""
    assert _main(idx_root, tmp_path, "--force") == 0
    out = tmp_path / "run"
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    weights = models.load_checkpoint(tmp_path / "ckpt.pt").model.state_dict()
    assert _main(idx_root, tmp_path, "--force") == 0
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    manifest = json.loads(second.pop("manifest.json"))
    first.pop("manifest.json")
    assert sorted(first) == sorted(second)
    assert {n for n in first if first[n] != second[n]} <= set(manifest["timing_outputs"])
    again = models.load_checkpoint(tmp_path / "ckpt.pt").model.state_dict()
    assert all(torch.equal(weights[k], again[k]) for k in weights)


@pytest.mark.parametrize("refused", ["out", "checkpoint"])
def test_under_torchrun_a_refused_out_stops_every_rank_with_its_reason(tmp_path, refused):
    """Rank 0 checks --out and --checkpoint (ranks need not share a disk); the other ranks
    stop with its words instead of failing inside the collective they would wait in."""
    out = tmp_path / ("not-a-run" if refused == "out" else "run")
    ckpt = tmp_path / "m.pt"
    if refused == "out":
        out.mkdir()
        (out / "file.txt").write_text("a user's file\n")
    else:
        ckpt.write_text("a user's file\n")  # no sidecar: never replaced
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    # rank 0 alone looks at the files (ranks need not share a disk): a check on another
    # rank fails loudly
    guard = tmp_path / "guarded_train.py"
    guard.write_text(
        "import os, sys\n"
        "from studies import train\n"
        "for name in ('check_out', '_check_checkpoint_target'):\n"
        "    def only_rank0(*a, _f=getattr(train, name), _n=name, **k):\n"
        "        assert os.environ.get('RANK', '0') == '0', f'{_n} ran on rank '"
        " + os.environ['RANK']\n"
        "        return _f(*a, **k)\n"
        "    setattr(train, name, only_rank0)\n"
        "sys.exit(train.main(sys.argv[1:]))\n")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", str(guard), *SMOKE, "--out", str(out), "--checkpoint",
         str(ckpt), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "ran on rank" not in done.stderr, done.stderr[-3000:]
    assert done.returncode != 0
    assert done.stderr.count(f"[train] error: --{refused}") == 2, done.stderr[-3000:]
    assert "broadcast_object_list" not in done.stderr and "gloo" not in done.stderr.lower()
    if refused == "checkpoint":
        assert ckpt.read_text() == "a user's file\n" and not out.exists()
        return
    assert (out / "file.txt").read_text() == "a user's file\n"
    assert not (tmp_path / "m.pt").exists()


def test_a_users_file_where_the_sidecar_would_go_is_refused_before_training(idx_root, tmp_path,
                                                                         capsys):
    """--checkpoint X with X missing and X.json someone's file: the run trained, then wrote
    its sidecar over X.json (or, X.json a folder, failed after training and could never be
    finished)."""
    for make in (lambda p: p.write_text('{"note": "mine"}'), lambda p: p.mkdir()):
        side = tmp_path / "ckpt.pt.json"
        make(side)
        assert _main(idx_root, tmp_path) == 2
        assert "is not a qerror checkpoint's sidecar" in capsys.readouterr().err
        assert not (tmp_path / "ckpt.pt").exists()
        assert not (tmp_path / "ckpt.pt.train-state.pt").exists()  # nothing trained
        if side.is_dir():
            side.rmdir()
        else:
            assert side.read_text() == '{"note": "mine"}'
            side.unlink()
    # and the library's writer refuses it too, writing nothing
    (tmp_path / "m.pt.json").write_text("mine")
    with pytest.raises(models.CheckpointError, match="not a qerror checkpoint's sidecar"):
        models.save_checkpoint(models.fashion_resnet("resnet18"), tmp_path / "m.pt",
                               arch="resnet18", stem="imagenet", config={}, metrics={})
    assert not (tmp_path / "m.pt").exists() and (tmp_path / "m.pt.json").read_text() == "mine"


def test_checkpoints_differing_in_suffix_keep_their_own_training_states(idx_root, tmp_path,
                                                                        capsys):
    """x.pt and x.pth shared x.train-state.pt: an interrupted x.pt run's state let a
    refused --checkpoint x.pth resume it and overwrite x.pth without --force."""
    other = tmp_path / "ckpt.pth"
    assert train.main([*SMOKE, "--data-root", str(idx_root), "--out", str(tmp_path / "r0"),
                       "--checkpoint", str(other), "--no-progress"]) == 0
    before = other.read_bytes()
    assert _main(idx_root, tmp_path, "--stop-after-steps", "3") == train.EXIT_INCOMPLETE
    assert (tmp_path / "ckpt.pt.train-state.pt").is_file()
    capsys.readouterr()
    assert train.main([*SMOKE, "--data-root", str(idx_root), "--out", str(tmp_path / "r1"),
                       "--checkpoint", str(other), "--no-progress"]) == 2
    assert "already holds a trained checkpoint" in capsys.readouterr().err
    assert other.read_bytes() == before and _state_step(tmp_path) == 3


def test_path_options_expand_the_home_folder(tmp_path, monkeypatch):
    """--checkpoint '~/x.pt' made a folder named '~' in the current one (--out expanded)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    args = train.build_parser().parse_args(["--checkpoint", "~/x.pt", "--out", "~/run",
                                            "--data-root", "~/fm"])
    assert (args.checkpoint, args.out, args.data_root) == (tmp_path / "x.pt", tmp_path / "run",
                                                           tmp_path / "fm")


def test_an_out_taken_during_training_says_the_work_is_kept(idx_root, tmp_path, capsys,
                                                            monkeypatch):
    """The refusal came after hours of training and said nothing of the checkpoint written
    and the state kept; the same command with a free --out finishes from them."""
    from studies._common import StudyError

    def taken(*args, **kwargs):
        raise StudyError("another run was written to --out while this one ran")

    monkeypatch.setattr(train, "RunDir", taken)
    assert _main(idx_root, tmp_path) == 2
    err = capsys.readouterr().err
    assert "The trained checkpoint is written" in err and "training state kept" in err
    assert (tmp_path / "ckpt.pt").is_file() and (tmp_path / "ckpt.pt.train-state.pt").is_file()


def test_a_cache_that_cannot_hold_the_checkpoint_is_named_as_the_cache(idx_root, tmp_path,
                                                                        monkeypatch, capsys):
    """Without --checkpoint the model goes to the cache: a cache folder that cannot be made
    is refused before training, in words that name the cache and the two ways out
    (XDG_CACHE_HOME, --checkpoint), not an option the user never passed."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    code = train.main([*SMOKE, "--data-root", str(idx_root), "--out", str(tmp_path / "run"),
                       "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"the cache's checkpoint {blocker}/qerror/checkpoints/" in err
    assert "set XDG_CACHE_HOME to a folder you can write in (an absolute path), or pass " \
        "--checkpoint" in err
    assert "pass --checkpoint in a folder" not in err
    assert not (tmp_path / "run").exists()


def test_a_ctrl_c_after_the_run_was_published_says_so_and_leaves_no_state(
        idx_root, tmp_path, monkeypatch, capsys):
    """A Ctrl-C held while the run moved into place (or while the run it replaced was being
    removed) comes after the run is complete at --out: the exit says so, and the training
    state, which has nothing left to finish, is removed, instead of advice to rerun a
    command that --out's now-complete run would refuse."""
    real_finish = _common.RunDir.finish

    def finish(self):
        final = real_finish(self)
        raise _common.PublishedInterrupt(f"it is complete at {final}")

    monkeypatch.setattr(_common.RunDir, "finish", finish)
    assert _main(idx_root, tmp_path) == train.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert f"interrupted after the run was published: it is complete at {tmp_path / 'run'}" \
        in err and "To write them" not in err
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["study"] == "train"
    assert (tmp_path / "ckpt.pt").is_file()
    assert not (tmp_path / "ckpt.pt.train-state.pt").exists()


def test_a_ctrl_c_just_after_publishing_says_the_run_is_published(idx_root, tmp_path,
                                                                   monkeypatch, capsys):
    """A Ctrl-C after finish() returned, as the state is removed or the summary printed,
    once gave the advice for an unwritten run (rerun the command) though the run was at
    --out and its state gone."""
    real_unlink = Path.unlink
    hit = []

    def unlink(self, *args, **kwargs):
        if self.name.endswith(".train-state.pt") and not hit and (tmp_path / "run").is_dir():
            hit.append(1)
            real_unlink(self, *args, **kwargs)
            raise KeyboardInterrupt
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert _main(idx_root, tmp_path) == train.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert hit and f"interrupted after the run was published: it is complete at " \
        f"{tmp_path / 'run'}" in err and "To write them" not in err
    assert not (tmp_path / "ckpt.pt.train-state.pt").exists()


def test_every_sessions_environment_is_recorded_and_a_change_is_warned(idx_root, tmp_path):
    """A run stopped under one torch thread and resumed under two is not the uninterrupted
    run bit for bit: the resume warns, and timing.json and the manifest keep both sessions'
    environments (torch_threads alone is the last session's)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _main(idx_root, tmp_path, "--stop-after-steps", "3") == train.EXIT_INCOMPLETE
        torch.set_num_threads(2)
        with pytest.warns(training.EnvironmentChangedWarning, match="torch_threads: 1 before"):
            assert _main(idx_root, tmp_path) == 0
    finally:
        torch.set_num_threads(threads)
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    sessions = timing["session_environments"]
    assert [e["torch_threads"] for e in sessions] == [1, 2] and timing["torch_threads"] == 2
    assert {e["device_type"] for e in sessions} == {"cpu"}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["training_sessions"] == sessions
    # cumulative: the second epoch's total holds the first's, and the validations
    totals = timing["cumulative_seconds_at_epoch_end"]
    assert len(totals) == 2 and 0 < totals[0] < totals[1] <= timing["train_seconds"]
    assert len(timing["validation_seconds"]) == 2
    assert "epoch_train_seconds" not in timing


@pytest.mark.parametrize("rank,local,others_fail", [(0, 0, False), (1, 0, False), (1, 1, False),
                                                    (1, 1, True)])
def test_under_torchrun_one_process_per_machine_downloads_and_the_others_wait(
        rank, local, others_fail, monkeypatch):
    # Ranks downloading at once would write the same files together: local rank 0 alone
    # downloads, before the rendezvous; the others read afterwards, without downloading,
    # and a failed download stops them with its message instead of a second try.
    events = []
    monkeypatch.setattr(data, "fashion_mnist_splits",
                        lambda *a, download, **k: events.append(("load", download)) or "splits")

    def gather(value):
        events.append(("rendezvous", value))
        return [data.DataNotFoundError("no internet on rank 0") if others_fail else None,
                value]
    monkeypatch.setattr(train.parallel, "gather_objects", gather)
    args = train.build_parser().parse_args([*SMOKE, "--download"])
    recipe = train.default_recipe(models.Arch.RESNET18, models.Stem.IMAGENET, smoke=True)
    place = training.Placement(rank, 2, local, torch.device("cpu"))
    if others_fail:
        with pytest.raises(data.DataNotFoundError, match="no internet on rank 0"):
            train.load_splits(args, recipe, place)
        assert events == [("rendezvous", None)]
        return
    assert train.load_splits(args, recipe, place) == "splits"
    if local == 0:
        assert events == [("load", True), ("rendezvous", None)]
    else:
        assert events == [("rendezvous", None), ("load", False)]
    # one process alone, or no --download: one load as asked, no rendezvous
    events.clear()
    assert train.load_splits(args, recipe, training.Placement(0, 1, 0, place.device)) == "splits"
    assert events == [("load", True)]



def test_a_checkpoint_that_is_a_link_is_checked_where_it_points(idx_root, tmp_path, capsys):
    """The checkpoint is written where a link at --checkpoint points (qerror.files.
    atomic_write): a target whose folder cannot be made was found only when the trained
    model was saved, and a loop of links was a RuntimeError's traceback."""
    blocker = tmp_path / "afile"
    blocker.write_text("a file")
    link = tmp_path / "ckpt.pt"
    link.symlink_to(blocker / "model.pt")
    assert _main(idx_root, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {link}, a link to {blocker / 'model.pt'}: {blocker} is a file" in err
    assert "point the link at a folder you can write in" in err and "Traceback" not in err
    link.unlink()
    link.symlink_to(link.name)
    assert _main(idx_root, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {link}: cannot follow it to a file" in err
    assert link.is_symlink() and not (tmp_path / "run").exists()


def test_a_ctrl_c_while_a_forced_run_writes_its_folder_says_what_it_left(
        idx_root, tmp_path, monkeypatch, capsys):
    """--force over a trained checkpoint and its run, Ctrl-C after the new checkpoint was
    written and before the run folder was: the message said only 'interrupted while writing
    the results' (not that the checkpoint is the new one while --out still describes the old),
    and its 'run the same command' kept --no-resume, which trains again from the start
    instead of writing the results from the saved state."""
    assert _main(idx_root, tmp_path) == 0
    old_sha = json.loads((tmp_path / "run" / "manifest.json").read_text())["model"]["sha256"]
    capsys.readouterr()

    def finish(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(_common.RunDir, "finish", finish)
        assert _main(idx_root, tmp_path, "--force", "--seed", "1", "--no-resume") == \
            train.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert sha256_file(tmp_path / "ckpt.pt") != old_sha  # the new checkpoint is written
    assert f"the trained checkpoint is written ({tmp_path / 'ckpt.pt'}) and --out " \
        f"{tmp_path / 'run'} still holds the previous run" in err
    said = err.split("run the same command without --no-resume: ", 1)[1].strip()
    argv = shlex.split(said)[3:]
    assert "--no-resume" not in argv and argv[:2] == SMOKE[:2]
    assert train.main(argv) == 0
    assert "resuming ckpt.pt.train-state.pt at step 16 of 16" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model"]["sha256"] == sha256_file(tmp_path / "ckpt.pt")
    assert manifest["config"]["recipe"]["seed"] == 1
    assert not (tmp_path / "ckpt.pt.train-state.pt").exists()
