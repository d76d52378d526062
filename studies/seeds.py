"""Train many seeds of a small plain CNN on Fashion-MNIST and measure the network claims on each.

The ledger's network claims (N1 drift grows with depth, N2 BatchNorm becomes inconsistent,
N3 saturation, N4 accuracy) are decided over the distribution across seeds, not on one
draw. This study trains ``--seeds`` copies of :func:`qerror.nn.models.plain_chain` (ten
conv-BN-ReLU layers, sixteen channels, 8×8 input from :func:`qerror.data.to_small_tensor`),
each from its own initialisation and batch order, on true labels; measures every quantity
of :func:`qerror.nn.seeds.network_statements` on each at 8, 6 and 4 bits under
round-to-nearest, truncation and floor; and writes:

* ``chains.pt``: the trained weights of every seed (``{seed: state_dict}``), which the test
  suite's claims tests load (a copy is committed under ``tests/data/seeds``) so that pytest
  decides the claims on trained networks without training them. The same seed gives the same
  weights on one machine; another CPU's kernels (AMX, AVX-512, AVX2) round differently and
  train other weights (retrained on an AMD EPYC, seed 0's weights differed from the committed
  ones by up to 0.50 and its float accuracy by 0.58 points; every N1–N4 decision held on
  the twenty retrained there);
* ``training.csv``: each seed's float test accuracy;
* ``statements.csv``: the measured quantities, one row per seed, width, mode and quantity;
* ``seeds.pdf``/``.png``: the deepest drift, the worst BatchNorm inconsistency and the
  accuracy of every seed, by width and mode;
* ``summary.json`` and ``manifest.json``.

The default run trains 20 seeds for 3 epochs on 10,000 training images each (about half a
minute a seed on one core of this kind of machine) and measures them on 512 test images.
``--smoke``: 2 seeds, 2 epochs, 1,024 training images, 128 test images.
"""

from __future__ import annotations

import textwrap
import time

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from qerror.data import fashion_mnist_splits, to_small_tensor
from qerror.files import torch_save
from qerror.nn.models import plain_chain
from qerror.nn.seeds import network_statements
from qerror.nn.training import TrainConfig, fit, tensor_batches
from studies._common import (
    DATA_ROOT_HELP,
    PRINT_WIDTH,
    RunDir,
    base_parser,
    check_out,
    figure_style,
    int_at_least,
    positive_int,
    refuse_seeds_past_64_bits,
    study_main,
    user_path,
)

EPOCHS, TRAIN_IMAGES, TEST_IMAGES, CALIB_IMAGES, LR, BATCH = 3, 10_000, 512, 256, 0.05, 128
MIN_STEPS = 10  # a one-cycle schedule with fewer steps has no warm-up step at all


def train_seed(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    """One seed of the plain chain, trained on ``(x, y)`` (initialisation and batch order
    from ``seed``)."""
    model = plain_chain(seed=seed)
    fit(model, tensor_batches(x, y), len(x),
        TrainConfig(epochs=epochs, batch_size=BATCH, lr=LR, seed=seed), progress=False)
    return model.eval()


FIGURE_QUANTITIES = (("drift_deep", "deepest conv: per-channel drift / float std", True),
                     ("bn_worst", "worst BatchNorm inconsistency", True),
                     ("accuracy", "test accuracy", False))


def figure_seeds(plt, statements: pd.DataFrame):
    """Each quantity across seeds: one point per seed, by width and mode."""
    # at the paper's text width: its text prints at the sizes set here
    fig, axes = plt.subplots(1, len(FIGURE_QUANTITIES), figsize=(PRINT_WIDTH, 2.9))
    modes = list(dict.fromkeys(statements["mode"]))
    widths = sorted(statements.bits.unique(), reverse=True)
    for ax, (quantity, title, log) in zip(axes, FIGURE_QUANTITIES):
        d = statements[statements.quantity == quantity]
        for j, mode in enumerate(modes):
            for k, bits in enumerate(widths):
                v = d[(d["mode"] == mode) & (d.bits == bits)].value.to_numpy()
                x = k + (j - (len(modes) - 1) / 2) * 0.25
                ax.plot(np.full(v.size, x), v, "o", ms=3, alpha=0.6, color=f"C{j}",
                        label=mode if k == 0 else None)
        ax.set_xticks(range(len(widths)), [f"{b} bits" for b in widths])
        if log:
            ax.set_yscale("log")
        ax.set_title(textwrap.fill(title, 30), fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6.5)
    fig.tight_layout()
    return fig


def _main(argv: list[str]) -> int:
    parser = base_parser("seeds", __doc__.splitlines()[0], force=True)
    parser.add_argument("--seeds", type=int_at_least(2), default=None,
                        help="networks to train (default 20; smoke 2)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help=f"epochs per network (default {EPOCHS}; smoke 2)")
    parser.add_argument("--train-images", type=positive_int, default=None,
                        help=f"training images per network (default {TRAIN_IMAGES:,}; smoke 1,024)")
    parser.add_argument("--test-images", type=int_at_least(2), default=None,
                        help=f"test images measured (default {TEST_IMAGES}; smoke 128)")
    parser.add_argument("--data-root", type=user_path, default=None, help=DATA_ROOT_HELP)
    args = parser.parse_args(argv)
    smoke = args.smoke
    seeds = args.seeds or (2 if smoke else 20)
    epochs = args.epochs or (2 if smoke else EPOCHS)
    n_train = args.train_images or (1024 if smoke else TRAIN_IMAGES)
    n_test = args.test_images or (128 if smoke else TEST_IMAGES)
    refuse_seeds_past_64_bits(parser, args.seed, seeds, f"--seeds {seeds}")
    if epochs * (n_train // BATCH) < MIN_STEPS:
        parser.error(f"--epochs {epochs} x --train-images {n_train}: {epochs * (n_train // BATCH)} "
                     f"steps of {BATCH} images; the one-cycle schedule needs at least "
                     f"{MIN_STEPS}, so train on more images or for more epochs")
    check_out(args.out, "seeds", force=args.force)
    splits = fashion_mnist_splits(args.data_root, seed=args.seed)
    if n_train > len(splits.train.labels) or n_test > len(splits.test.labels):
        parser.error(f"--train-images {n_train} / --test-images {n_test}: more than the "
                     f"{len(splits.train.labels):,} training / {len(splits.test.labels):,} "
                     "test images")
    x = to_small_tensor(splits.train.images[:n_train])
    y = torch.from_numpy(splits.train.labels[:n_train])
    calib = to_small_tensor(splits.calib.images[:CALIB_IMAGES])
    xt = to_small_tensor(splits.test.images[:n_test])
    yt = torch.from_numpy(splits.test.labels[:n_test])
    config = {"seeds": seeds, "epochs": epochs, "train_images": n_train, "test_images": n_test,
              "calib_images": CALIB_IMAGES, "lr": LR, "batch_size": BATCH, "seed": args.seed,
              "smoke": smoke, "network": "plain_chain(depth=10, width=16), 8x8 input"}
    started = time.perf_counter()
    with RunDir(args.out, "seeds", argv, config, force=args.force) as run:
        run.extra.update(data={"source": splits.train.source, "train_sha256": splits.train.sha256,
                               "calib_sha256": splits.calib.sha256,
                               "test_sha256": splits.test.sha256})
        weights, frames = {}, []
        for s in tqdm(range(args.seed, args.seed + seeds), desc="seeds", unit="network"):
            model = train_seed(s, x, y, epochs)
            weights[s] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            frames.append(network_statements(model, calib, xt, yt, seed=s).assign(seed=s))
        torch_save(weights, run.path("chains.pt"), "the networks' weights (chains.pt)")
        statements = pd.concat(frames, ignore_index=True)
        # The float network's test accuracy, measured with the statements (the same under
        # every width and mode).
        accuracy = (statements[statements.quantity == "float_accuracy"]
                    .groupby("seed", sort=True).value.first().rename("float_accuracy")
                    .reset_index())
        run.write_csv("training.csv", accuracy)
        run.write_csv("statements.csv", statements)
        run.write_json("summary.json", {
            "seeds": seeds,
            "median": statements.groupby(["quantity", "bits", "mode"]).value.median()
            .reset_index().to_dict(orient="records")})
        plt = figure_style()
        fig = figure_seeds(plt, statements)
        run.save_figure(fig, "seeds")
        plt.close(fig)
        out = run.finish()
    print(f"[seeds] {seeds} networks in {time.perf_counter() - started:.0f} s; written to {out}")
    return 0


main = study_main(_main)


if __name__ == "__main__":
    raise SystemExit(main())
