"""python -m studies.seeds: many trained seeds of the plain chain, measured."""

from __future__ import annotations

import json

import pandas as pd
import torch

from qerror.data import fashion_mnist_splits
from qerror.nn.models import plain_chain
from qerror.nn.seeds import STATEMENT_MODES
from studies import seeds


def test_smoke_run_trains_each_seed_and_measures_it(fashion_idx, tmp_path):
    root = fashion_idx(train=7100, test=200)
    out = tmp_path / "seeds"
    assert seeds.main(["--smoke", "--seed", "5", "--data-root", str(root), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("chains.pt", "training.csv", "statements.csv", "summary.json", "seeds.pdf",
                 "seeds.png"):
        assert name in manifest["outputs"], name
    weights = torch.load(out / "chains.pt", weights_only=True)
    assert sorted(weights) == [5, 6]  # --seed 5, two networks
    model = plain_chain()
    model.load_state_dict(weights[5])  # the plain chain's own state dict, trained
    assert not torch.equal(weights[5]["0.weight"], plain_chain(seed=5).state_dict()["0.weight"])
    assert not torch.equal(weights[5]["0.weight"], weights[6]["0.weight"])
    st = pd.read_csv(out / "statements.csv")
    assert sorted(st.seed.unique()) == [5, 6]
    assert sorted(st.bits.unique()) == [4, 6, 8]
    assert set(st["mode"]) == {m.value for m in STATEMENT_MODES}
    train = pd.read_csv(out / "training.csv")
    # the float accuracy the study reports is the one measured with the statements
    fl = st[(st.quantity == "float_accuracy")].groupby("seed").value.first()
    assert (train.set_index("seed").float_accuracy == fl).all()
    assert manifest["config"]["test_images"] == 128
    # the images the networks were trained, calibrated and measured on, by their hashes
    splits = fashion_mnist_splits(root, seed=5)
    assert manifest["data"] == {"source": str(root), "train_sha256": splits.train.sha256,
                                "calib_sha256": splits.calib.sha256,
                                "test_sha256": splits.test.sha256}


def test_a_data_root_under_home_is_expanded(tmp_path, monkeypatch, capsys):
    # '~/fm' (quoted, as a shell leaves it) is the home folder's fm, not a folder named '~'
    monkeypatch.setenv("HOME", str(tmp_path))
    assert seeds.main(["--smoke", "--data-root", "~/fm", "--out", str(tmp_path / "out")]) != 0
    assert f"{tmp_path / 'fm'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
