"""Models: the Fashion-MNIST ResNets, ImageNet weights from a local file, the checkpoint cache."""

import json
import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from qerror.files import name_bytes, name_max, sha256_file
from qerror.nn import models
from qerror.nn.models import (
    Arch,
    CheckpointError,
    CheckpointNotFoundError,
    StateDictMismatchError,
    Stem,
    WeightsNotFoundError,
    fashion_resnet,
    forward_layout,
    memory_format,
)
from qerror.rounding import RoundingMode


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """No test reads or writes the real qerror or torch hub caches."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


# Resolution at which layer1 runs, per stem, for 32×32 input.
LAYER1_SIZE = {Stem.IMAGENET: 8, Stem.CONV3_POOL: 16, Stem.CIFAR: 32}


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("stem", list(Stem))
def test_fashion_resnet_shapes(arch, stem):
    model = models.fashion_resnet(arch, stem.value, num_classes=7).eval()
    seen = {}
    model.layer1.register_forward_hook(lambda m, i, o: seen.update(layer1=o.shape))
    with torch.inference_mode():
        out = model(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 7)
    assert seen["layer1"][-2:] == (LAYER1_SIZE[stem],) * 2
    assert model.conv1.in_channels == 1
    # Everything but the stem and the classifier is torchvision's model, key for key.
    reference = getattr(torchvision.models, arch.value)(weights=None).state_dict()
    ours = model.state_dict()
    assert ours.keys() == reference.keys()
    assert all(ours[k].shape == reference[k].shape for k in ours
               if not k.startswith(("conv1.", "fc.")))


def test_fashion_resnet_is_seeded_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = models.fashion_resnet("resnet18", seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    b = models.fashion_resnet("resnet18", seed=5)
    c = models.fashion_resnet("resnet18", seed=6)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_bad_arch_stem_and_num_classes_are_refused():
    with pytest.raises(ValueError, match="resnet50"):
        models.fashion_resnet("vgg16")
    with pytest.raises(ValueError, match="conv3-pool"):
        models.fashion_resnet("resnet18", "huge")
    with pytest.raises(ValueError, match="num_classes"):
        models.fashion_resnet("resnet18", num_classes=0)


def test_fashion_small_cnn_shapes_seed_and_checks():
    from qerror.nn import check_model, layer_names

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = models.fashion_small_cnn(8, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    b = models.fashion_small_cnn(8, seed=5)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.training and a.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    check_model(a, need_batchnorm=True)
    assert len(layer_names(a)) == 5  # four convolutions and the classifier
    weights = sum(m.weight.numel() for m in a.modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert weights == 9 * (1 + 2 * 8 + 8 * 8 + 16 * 8) * 8 + 32 * 10  # 9·(w+2w²+8w²+16w²)+320
    with pytest.raises(ValueError, match="width"):
        models.fashion_small_cnn(0)


def _resnet50_state_file(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50-local.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_imagenet_resnet50_from_a_local_state_dict_file(tmp_path):
    reference, path = _resnet50_state_file(tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for weights in (path, str(path)):
        model = models.imagenet_resnet50(weights)
        assert not model.training
        with torch.inference_mode():
            assert torch.equal(model(x), reference(x))


def test_state_dict_without_batch_counters_loads(tmp_path):
    reference, path = _resnet50_state_file(tmp_path)
    old = {k: v for k, v in reference.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    torch.save(old, path)
    model = models.imagenet_resnet50(path)
    assert torch.equal(model.fc.weight, reference.fc.weight)


def test_wrong_architecture_is_refused_with_the_keys_named(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    with pytest.raises(StateDictMismatchError) as info:
        models.imagenet_resnet50(path)
    msg = str(info.value)
    assert "nothing was loaded" in msg
    assert "missing keys" in msg and "layer1.0.conv3.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "shape mismatches (" in msg
    assert "layer1.0.conv1.weight: (64, 64, 3, 3) given, (64, 64, 1, 1) expected" in msg


def test_a_mismatched_state_dict_changes_nothing():
    model = torchvision.models.resnet50(weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = torchvision.models.resnet50(weights=None, num_classes=10).state_dict()
    # A plain strict load_state_dict copies every fitting tensor before it raises.
    with pytest.raises(StateDictMismatchError, match="fc.weight"):
        models.load_state_dict_exactly(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_state_dict_of_another_dtype_kind_is_refused_and_a_wider_float_loads():
    """A complex tensor (its imaginary part would be dropped with a warning) or integers for
    a float weight (cast silently) are refused, nothing loaded; float64 for a float32
    weight is the same kind and is cast."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for key, value in (("0.weight", torch.ones(2, 3, dtype=torch.complex64)),
                       ("0.weight", torch.ones(2, 3, dtype=torch.int64)),
                       ("1.num_batches_tracked", torch.tensor(1.5))):
        state = {**before, key: value}
        with pytest.raises(StateDictMismatchError, match=f"{key}: {value.dtype} given"):
            models.load_state_dict_exactly(model, state)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    wide = {k: v.double() if v.is_floating_point() else v for k, v in before.items()}
    models.load_state_dict_exactly(model, wide)
    assert model[0].weight.dtype == torch.float32


def test_values_are_checked_as_they_would_be_loaded_in_the_models_dtype(tmp_path):
    """A float64 weight beyond float32's range passed the finiteness check and loaded as
    Inf (a float32 one beyond float16's into a half model too); a float8 weight, which
    loads exactly, and a packed float4 pair, which torch cannot cast, stopped the check with
    NotImplementedError ('"isinf" not implemented for Float8_e4m3fn')."""
    model = fashion_resnet("resnet18", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = fashion_resnet("resnet18", seed=1).state_dict()
    wide = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    wide["fc.weight"][0, 0] = 1e300
    with pytest.raises(models.NonFiniteWeightsError,
                       match="fc.weight holds 1 Inf once cast from torch.float64 to torch.float32"):
        models.load_state_dict_exactly(model, wide)
    half = fashion_resnet("resnet18", seed=0).half()
    with pytest.raises(models.NonFiniteWeightsError, match="fc.weight holds 5120 Inf once"):
        models.load_state_dict_exactly(half, {**state, "fc.weight": state["fc.weight"] + 1e5})
    packed = torch.zeros(state["fc.weight"].shape, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(StateDictMismatchError, match="cannot cast.*fc.weight: torch.float4"):
        models.load_state_dict_exactly(model, {**state, "fc.weight": packed})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    narrow = state["fc.weight"].to(torch.float8_e4m3fn)
    models.load_state_dict_exactly(model, {**state, "fc.weight": narrow})
    assert torch.equal(model.fc.weight, narrow.float())
    path = tmp_path / "ckpt.pt"
    double = fashion_resnet("resnet18").double()
    double.load_state_dict(wide)  # a float64 model, finite, beyond what its checkpoint holds
    with pytest.raises(models.NonFiniteWeightsError, match="once cast"):
        models.save_checkpoint(double, path, arch="resnet18", stem="imagenet", config=CONFIG,
                               metrics=METRICS)
    assert not list(tmp_path.iterdir())
    models.save_checkpoint(model, path, arch="resnet18", stem="imagenet", config=CONFIG,
                           metrics=METRICS)
    _rewrite_payload(path, lambda sd: sd.update(wide))
    _refused(path, "fc.weight holds 1 Inf once cast")


def _quiet(make):
    """``make`` without torch's warnings that CSR tensors are beta and quantized ones
    deprecated (given once per process, so not asserted)."""
    def made(value):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return make(value)
    return made


NOT_DENSE = {"sparse": ("fc.weight", lambda v: v.to_sparse()),
             "sparse CSR": ("fc.weight", _quiet(lambda v: v.to_sparse_csr())),
             "quantized": ("layer1.0.bn1.num_batches_tracked", _quiet(
                 lambda v: torch.quantize_per_tensor(v.float(), 1.0, 0, torch.qint32)))}


# torch's own notes on loading such tensors from a file, which this test writes on purpose
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants:UserWarning",
                            "ignore:TypedStorage is deprecated:UserWarning")
@pytest.mark.parametrize("kind", list(NOT_DENSE))
def test_a_sparse_or_quantized_tensor_is_refused_before_anything_is_loaded(kind, tmp_path):
    """load_state_dict copied every tensor before a sparse fc.weight (21 of the 22 a
    seed-1 ResNet18 changes) and then raised a RuntimeError; a quantized batch counter
    passed as an integer. The caller's model was half-loaded, and load_checkpoint let the
    RuntimeError out where it promises a CheckpointError."""
    key, make = NOT_DENSE[kind]
    model = fashion_resnet("resnet18", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = fashion_resnet("resnet18", seed=1).state_dict()
    state[key] = make(state[key])
    with pytest.raises(StateDictMismatchError, match=re.escape(key) + ".*nothing was loaded"):
        models.load_state_dict_exactly(model, state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    path = tmp_path / "ckpt.pt"
    models.save_checkpoint(model, path, arch="resnet18", stem="imagenet", config=CONFIG,
                           metrics=METRICS)
    _rewrite_payload(path, lambda sd: sd.update({key: make(sd[key])}))
    _refused(path, "not plain dense")


def test_foreign_file_and_missing_weights_are_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(StateDictMismatchError, match="not a readable torch state-dict file"):
        models.imagenet_resnet50(junk)
    torch.save({"model": {}}, junk)
    with pytest.raises(StateDictMismatchError, match="entries are not tensors: model"):
        models.imagenet_resnet50(junk)
    with pytest.raises(WeightsNotFoundError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        models.imagenet_resnet50(tmp_path / "nowhere.pth")


def test_named_weights_outside_the_hub_cache_name_every_way_to_get_them(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        models.imagenet_resnet50("IMAGENET1K_V2")
    msg = str(info.value)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert "download=True" in msg and "--download" in msg
    assert str(hub / "resnet50-11ad3fa6.pth") in msg
    assert "local state-dict file" in msg


class _RunsCode:
    """Unpickled, it creates the file ``marker``: a pickle that runs code when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_named_weights_in_the_hub_cache_load_only_with_their_hash(tmp_path, monkeypatch):
    # torchvision checks the hash in the file's name only when it downloads, and loads a
    # cached file with weights_only=False: a file copied there (the help says to) ran its
    # pickle's code, and random or NaN weights loaded as IMAGENET1K_V2.
    reference, local = _resnet50_state_file(tmp_path)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    cached = hub / "resnet50-11ad3fa6.pth"  # IMAGENET1K_V2's name in the cache
    marker = tmp_path / "code-ran"
    cases = {"code": {**reference.state_dict(), "x": _RunsCode(marker)},
             "nan": {**reference.state_dict(), "fc.bias": torch.full((1000,), float("nan"))},
             "random": reference.state_dict()}
    for state in cases.values():
        torch.save(state, cached)
        with pytest.raises(WeightsNotFoundError) as info:
            models.imagenet_resnet50(torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
        msg = str(info.value)
        assert f"{cached} in the torch hub cache is not torchvision's IMAGENET1K_V2" in msg
        assert "not 11ad3fa6 as its name says" in msg and "delete it" in msg
        assert "--download" in msg
        assert not marker.exists()
    cached.write_bytes(b"")  # a cut copy
    with pytest.raises(WeightsNotFoundError, match="is not torchvision's"):
        models.imagenet_resnet50("IMAGENET1K_V2")
    # a file whose sha256 does begin with its name's digits loads, exactly
    good = hub / f"resnet50-{sha256_file(local)[:8]}.pth"
    local.rename(good)
    monkeypatch.setattr(models, "_hub_file", lambda weights: good)
    model = models.imagenet_resnet50("IMAGENET1K_V2")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(model(x), reference(x))


def test_imagenet_weights_replaced_after_their_hash_lend_it_no_weights(tmp_path,
                                                                       monkeypatch):
    # A rewrite of the file that lands between the hash and the read: the hub cache's file
    # was hashed, then opened again by name, so other weights loaded under the digits
    # checked; a local file's hash (a study's record of it) was a second read of its own.
    reference, local = _resnet50_state_file(tmp_path)
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    good = hub / f"resnet50-{sha256_file(local)[:8]}.pth"
    monkeypatch.setattr(models, "_hub_file", lambda weights: good)
    real = models.sha256_file

    def hash_then_replace(file):
        digest = real(file)
        if other.exists():
            models.os.replace(other, file if isinstance(file, (str, Path)) else file.name)
        return digest

    monkeypatch.setattr(models, "sha256_file", hash_then_replace)
    for path, load in ((good, lambda: models.imagenet_resnet50("IMAGENET1K_V2")),
                       (local, lambda: models.load_imagenet_resnet50(local))):
        if path != local:
            path.write_bytes(local.read_bytes())  # torch.save's bytes follow the file's name
        expected_sha = real(path)
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
        loaded = load()
        model = loaded if isinstance(loaded, torch.nn.Module) else loaded.model
        assert not other.exists()  # the file was replaced while it loaded
        assert real(path) != expected_sha
        with torch.inference_mode():
            assert torch.equal(model(x), reference(x))
        if not isinstance(loaded, torch.nn.Module):
            assert loaded.sha256 == expected_sha and loaded.path == path.absolute()


def test_named_weights_are_downloaded_with_their_hash_checked(tmp_path, monkeypatch):
    calls = []

    def refuse(url, dst, hash_prefix, progress):
        calls.append((url, dst, hash_prefix))
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "00")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    with pytest.raises(WeightsNotFoundError, match="could not download .* invalid hash"):
        models.imagenet_resnet50("IMAGENET1K_V2", download=True, progress=False)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert calls == [(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url,
                      str(hub / "resnet50-11ad3fa6.pth"), "11ad3fa6")]
    assert not (hub / "resnet50-11ad3fa6.pth").exists()


def _trained_like_model():
    model = models.fashion_resnet("resnet18", seed=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(17)
    return model.eval()


CONFIG = {"recipe": {"epochs": 3, "lr": 0.1}}
METRICS = {"test_accuracy": 0.93}


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = _trained_like_model()
    path = models.default_checkpoint_path("resnet18", "imagenet")
    assert path == tmp_path / "xdg" / "qerror" / "checkpoints" / "fashion-resnet18-imagenet.pt"
    saved = models.save_checkpoint(model, path, arch="resnet18", stem=Stem.IMAGENET,
                                   config=CONFIG, metrics=METRICS)
    sidecar = json.loads(models.sidecar_path(path).read_text())
    assert sidecar["sha256"] == saved.sha256 and sidecar["bytes"] == path.stat().st_size
    assert sidecar["arch"] == "resnet18" and sidecar["num_classes"] == 10
    assert {"torch", "torchvision", "qerror"} <= sidecar["versions"].keys()
    loaded = models.load_checkpoint(path, expected_arch=Arch.RESNET18, expected_stem="imagenet",
                                    expected_num_classes=10)
    assert not loaded.model.training
    assert loaded.info.config == CONFIG and loaded.info.metrics == METRICS
    assert loaded.info.sha256 == saved.sha256
    ours, theirs = model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(x), loaded.model(x))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".json"]


def test_a_checkpoint_named_relatively_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    # a run's manifest records info.path; read back from another working folder, a relative
    # path named another file (or none)
    monkeypatch.chdir(tmp_path)
    saved = models.save_checkpoint(_trained_like_model(), "ckpt.pt", arch="resnet18",
                                   stem="imagenet", config=CONFIG, metrics=METRICS)
    loaded = models.load_checkpoint("ckpt.pt")
    assert saved.path == loaded.info.path == tmp_path / "ckpt.pt"
    assert loaded.info.path.is_absolute()


@pytest.fixture
def saved_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    models.save_checkpoint(_trained_like_model(), path, arch="resnet18", stem="imagenet",
                           config=CONFIG, metrics=METRICS)
    return path


def _refused(path, match, retrain="python -m studies.train --arch resnet18 --stem imagenet",
             **expected):
    """The refusal, which must say to delete the file and how to retrain."""
    with pytest.raises(CheckpointError, match=match) as info:
        models.load_checkpoint(path, **expected)
    msg = str(info.value)
    assert "Delete it" in msg and retrain in msg
    return msg


def test_flipped_byte_is_refused(saved_checkpoint):
    raw = bytearray(saved_checkpoint.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    saved_checkpoint.write_bytes(bytes(raw))
    _refused(saved_checkpoint, "does not match")


def test_a_checkpoint_replaced_after_its_hash_lends_it_no_weights(saved_checkpoint, monkeypatch):
    # A --force rewrite that lands between the hash and the read: load_checkpoint opened the
    # file again by name and returned the new weights under the old file's sha256.
    other = saved_checkpoint.with_name("other.pt")
    models.save_checkpoint(fashion_resnet("resnet18", seed=9).eval(), other, arch="resnet18",
                           stem="imagenet", config={"other": True}, metrics=METRICS)
    expected_sha = sha256_file(saved_checkpoint)
    real = models.sha256_file

    def hash_then_replace(file):
        digest = real(file)
        models.os.replace(other, saved_checkpoint)
        models.os.replace(models.sidecar_path(other), models.sidecar_path(saved_checkpoint))
        return digest

    monkeypatch.setattr(models, "sha256_file", hash_then_replace)
    ckpt = models.load_checkpoint(saved_checkpoint)
    assert ckpt.info.sha256 == expected_sha and ckpt.info.config == CONFIG
    assert torch.equal(ckpt.model.conv1.weight, _trained_like_model().conv1.weight)


def test_truncated_file_is_refused(saved_checkpoint):
    raw = saved_checkpoint.read_bytes()
    saved_checkpoint.write_bytes(raw[:len(raw) // 3])
    _refused(saved_checkpoint, "truncated")


def test_sidecar_mismatch_or_absence_is_refused(saved_checkpoint):
    side = models.sidecar_path(saved_checkpoint)
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "sha256": "0" * 64}))
    _refused(saved_checkpoint, "does not match")
    side.write_text(json.dumps({**meta, "num_classes": 11}))
    _refused(saved_checkpoint, "disagree on num_classes")
    # A sidecar without the format's mark, or not JSON at all (qerror writes its sidecars
    # atomically, so it never leaves a cut one), is someone's own X.json beside their own
    # X: refused, and neither file is to be deleted.
    before = saved_checkpoint.read_bytes()
    for text in ("{not json", json.dumps({"sha256": meta["sha256"], "bytes": meta["bytes"]}),
                 json.dumps([1, 2])):
        side.write_text(text)
        with pytest.raises(CheckpointError, match="not a qerror checkpoint's sidecar") as info:
            models.load_checkpoint(saved_checkpoint)
        msg = str(info.value)
        assert "Both are left as they are" in msg and "Delete" not in msg
        assert not models.has_checkpoint_sidecar(saved_checkpoint)
        assert saved_checkpoint.read_bytes() == before and side.read_text() == text
    side.write_text(json.dumps(meta))
    assert models.has_checkpoint_sidecar(saved_checkpoint)
    # Without a sidecar it may be a user's own model file: refused, never to be deleted.
    side.unlink()
    with pytest.raises(CheckpointError, match="is not a qerror checkpoint") as info:
        models.load_checkpoint(saved_checkpoint)
    msg = str(info.value)
    assert "It is left as it is" in msg and "Delete" not in msg and ".json" in msg
    assert "`python -m studies.train --checkpoint NEW_FILE`" in msg


def _rewrite_meta(path, key, value):
    """Set ``key`` of both the payload and the sidecar, and record the new sha256 and size:
    a file whose hash matches, made by hand or by a damaged writer."""
    payload = torch.load(path, weights_only=True)
    payload[key] = value
    torch.save(payload, path)
    side = models.sidecar_path(path)
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, key: value, "sha256": sha256_file(path),
                                "bytes": path.stat().st_size}))


@pytest.mark.parametrize("where, key, value", [
    ("sidecar", "sha256", 5), ("sidecar", "sha256", None), ("sidecar", "bytes", 2.5),
    ("sidecar", "arch", ["resnet18"]), ("sidecar", "stem", {"a": 1}),
    ("both", "num_classes", 10.0), ("both", "num_classes", "10"),
    ("both", "num_classes", True), ("both", "num_classes", None)])
def test_fields_of_another_type_are_refused_as_a_damaged_checkpoint(saved_checkpoint, where,
                                                                    key, value):
    """A sidecar's sha256 that is no string stopped the refusal's own message with a
    TypeError ("'int' object is not subscriptable"), a list or dict for its arch or stem the
    hint's set lookup ("unhashable type"), and a num_classes of another type in a file whose
    hash matches the model's build ("num_classes must be an int"): TypeErrors where a
    CheckpointError saying what is wrong was promised."""
    if where == "sidecar":
        side = models.sidecar_path(saved_checkpoint)
        side.write_text(json.dumps({**json.loads(side.read_text()), key: value}))
    else:
        _rewrite_meta(saved_checkpoint, key, value)
    retrain = "python -m studies.train" + (" --arch resnet18 --stem imagenet"
                                           if where == "both" else "")
    _refused(saved_checkpoint, key if where == "sidecar" else "num_classes must be an int",
             retrain=retrain)


def test_not_a_torch_file_is_refused_even_with_a_matching_hash(tmp_path):
    path = tmp_path / "fake.pt"
    path.write_bytes(b"\x00" * 1000)
    meta = {"format": models.CHECKPOINT_FORMAT, "sha256": sha256_file(path), "bytes": 1000,
            "arch": "resnet18", "stem": "imagenet"}
    models.sidecar_path(path).write_text(json.dumps(meta))
    _refused(path, "not a readable torch file")


def test_another_model_is_named_and_not_condemned(saved_checkpoint):
    """A valid checkpoint of another architecture is not damaged: the message says what it
    is, how to use it and where the one asked for goes, and never to delete it."""
    before = saved_checkpoint.read_bytes()
    with pytest.raises(CheckpointError) as info:
        models.load_checkpoint(saved_checkpoint, expected_arch="resnet50")
    msg = str(info.value)
    for phrase in (f"{saved_checkpoint} is a valid checkpoint", "resnet18 with the imagenet stem",
                   "its arch is resnet18, resnet50 was asked for",
                   "the study's --arch/--model resnet18 (expected_arch='resnet18'",
                   "`python -m studies.train --arch resnet50 --stem imagenet`",
                   str(models.default_checkpoint_path("resnet50", "imagenet")), "keep this file"):
        assert phrase in msg
    assert "Delete" not in msg and "refusing" not in msg
    with pytest.raises(CheckpointError, match="its num_classes is 10, 100 was asked for") \
            as info:
        models.load_checkpoint(saved_checkpoint, expected_num_classes=100)
    # it named no way to use the file ("ask for its model: the same settings", which gives
    # the same refusal): the argument that does, and whether a study takes the file
    msg = str(info.value)
    assert ("ask for its model in Python (expected_arch='resnet18', expected_stem='imagenet', "
            "expected_num_classes=10); the studies take it as it is.") in msg
    assert "the same settings" not in msg and "keep this file" in msg
    seven = saved_checkpoint.with_name("seven.pt")
    models.save_checkpoint(fashion_resnet("resnet18", num_classes=7), seven, arch="resnet18",
                           stem="imagenet", config=CONFIG, metrics=METRICS)
    with pytest.raises(CheckpointError, match="its num_classes is 7, 10 was asked for") as info:
        models.get_baseline("resnet18", path=seven)
    msg = str(info.value)
    assert ("ask for its model in Python (expected_arch='resnet18', expected_stem='imagenet', "
            "expected_num_classes=7); no study takes it: they take a classifier of "
            "Fashion-MNIST's 10 classes.") in msg
    assert "the same settings" not in msg and "keep this file" in msg
    assert saved_checkpoint.read_bytes() == before
    assert models.load_checkpoint(saved_checkpoint, expected_arch="resnet18").info.arch \
        is Arch.RESNET18
    assert "--stem" not in msg.split("(expected_arch")[0]  # only the arch differs
    absent = saved_checkpoint.with_name("absent.pt")
    with pytest.raises(CheckpointNotFoundError,
                       match=f"Train one there with `python -m studies.train --checkpoint "
                             f"{absent}`"):
        models.load_checkpoint(absent)
    with pytest.raises(CheckpointError, match="--stem conv3-pool") as info:
        models.load_checkpoint(saved_checkpoint, expected_stem="conv3-pool")
    assert "--arch" not in str(info.value).split("(expected_arch")[0]


def _rewrite_payload(path, change):
    """Change a checkpoint's payload and record its new sha256 and size in the sidecar, as a
    file saved that way (by an older qerror, or by hand) would have them."""
    payload = torch.load(path, weights_only=True)
    change(payload["state_dict"])
    torch.save(payload, path)
    side = models.sidecar_path(path)
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "sha256": sha256_file(path),
                                "bytes": path.stat().st_size}))


def _poison(state):
    state["layer1.0.conv1.weight"].view(-1)[:3] = float("nan")
    state["fc.bias"][4] = float("-inf")


def test_non_finite_weights_are_refused_at_load_naming_the_tensor(saved_checkpoint):
    _rewrite_payload(saved_checkpoint, _poison)
    msg = _refused(saved_checkpoint, "non-finite")
    assert "layer1.0.conv1.weight holds 3 NaN" in msg and "fc.bias holds 1 Inf" in msg


def test_non_finite_weights_are_refused_at_save_and_nothing_is_written(tmp_path):
    model = _trained_like_model()
    with torch.no_grad():
        _poison(model.state_dict())
    path = tmp_path / "out" / "ckpt.pt"
    with pytest.raises(models.NonFiniteWeightsError) as info:
        models.save_checkpoint(model, path, arch="resnet18", stem="imagenet", config=CONFIG,
                               metrics=METRICS)
    msg = str(info.value)
    assert "layer1.0.conv1.weight holds 3 NaN" in msg and "nothing was written" in msg
    assert not path.parent.exists() or not list(path.parent.iterdir())


def test_non_finite_imagenet_state_dict_is_refused(tmp_path):
    reference, path = _resnet50_state_file(tmp_path)
    state = reference.state_dict()
    state["layer2.0.bn1.running_var"][0] = float("inf")
    torch.save(state, path)
    with pytest.raises(StateDictMismatchError, match="layer2.0.bn1.running_var holds 1 Inf"):
        models.imagenet_resnet50(path)


def test_failed_write_keeps_the_old_file(saved_checkpoint):
    before = saved_checkpoint.read_bytes()

    def fail(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models.atomic_write(saved_checkpoint, fail)
    assert saved_checkpoint.read_bytes() == before
    assert sorted(p.name for p in saved_checkpoint.parent.iterdir()) == ["ckpt.pt", "ckpt.pt.json"]


def test_a_full_disk_is_an_os_error_naming_the_checkpoint(saved_checkpoint):
    # torch.save's writer reports a failed write as a RuntimeError naming a C++ line
    # ("[enforce fail at inline_container.cc:...] unexpected pos"), which a study took for a
    # bug (a traceback) instead of the OSError it reports in one line. A file-size limit makes
    # every write past it fail with EFBIG, as a full disk fails with ENOSPC.
    resource = pytest.importorskip("resource")
    import signal

    before = saved_checkpoint.read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, limits[1]))
        with pytest.raises(OSError) as info:
            models.save_checkpoint(_trained_like_model(), saved_checkpoint, arch="resnet18",
                                   stem="imagenet", config=CONFIG, metrics={"other": 1})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    msg = str(info.value)
    assert f"could not write the checkpoint {saved_checkpoint}" in msg
    assert "MiB free" in msg and "Nothing was replaced" in msg
    assert saved_checkpoint.read_bytes() == before
    assert models.load_checkpoint(saved_checkpoint).info.metrics == METRICS


def test_get_baseline_loads_or_refuses_with_the_training_command():
    path = models.default_checkpoint_path("resnet18")
    with pytest.raises(CheckpointNotFoundError, match="python -m studies.train --arch resnet18"):
        models.get_baseline("resnet18")
    models.save_checkpoint(_trained_like_model(), path, arch="resnet18", stem="imagenet",
                           config=CONFIG, metrics=METRICS)
    got = models.get_baseline("resnet18")
    assert got.info.path == path and got.info.metrics == METRICS
    with pytest.raises(CheckpointError, match="valid checkpoint .* of another model"):
        models.get_baseline("resnet50", path=path)  # another architecture's file

def test_a_first_write_cut_before_its_sidecar_leaves_a_provisional_one(tmp_path, monkeypatch):
    """On a first write the weights never stand without a sidecar: cut after them, the file
    has a provisional sidecar, so it is refused as an interrupted write (not as a foreign
    file: studies.train replaces a file with a sidecar when it resumes), and the next write
    finishes it."""
    path = tmp_path / "first.pt"
    calls = []
    real = models.atomic_write

    def cut(target, write):
        calls.append(Path(target).name)
        if len(calls) == 3:  # the provisional sidecar, the weights, then the final sidecar
            raise KeyboardInterrupt
        return real(target, write)

    monkeypatch.setattr(models, "atomic_write", cut)
    with pytest.raises(KeyboardInterrupt):
        models.save_checkpoint(_trained_like_model(), path, arch="resnet18", stem="imagenet",
                               config=CONFIG, metrics=METRICS)
    monkeypatch.setattr(models, "atomic_write", real)
    assert calls == ["first.pt.json", "first.pt", "first.pt.json"]
    assert json.loads(models.sidecar_path(path).read_text())["pending"] is True
    with pytest.raises(CheckpointError, match="provisional: the write that made it was "
                                              "interrupted"):
        models.load_checkpoint(path)
    info = models.save_checkpoint(_trained_like_model(), path, arch="resnet18", stem="imagenet",
                                  config=CONFIG, metrics=METRICS)
    assert models.load_checkpoint(path).info.sha256 == info.sha256
    assert "pending" not in json.loads(models.sidecar_path(path).read_text())


@pytest.mark.parametrize("first", [False, True], ids=["rewrite", "first-write"])
def test_a_ctrl_c_between_the_weights_and_their_sidecar_waits_for_both(tmp_path, monkeypatch,
                                                                       first):
    """A real SIGINT just after the weights' rename: it is raised once the sidecar is in
    place too, so the new pair loads (without the hold a rewrite left new weights beside the
    old sidecar, refused as corrupt, and a first write a provisional sidecar)."""
    import signal

    path = tmp_path / "ckpt.pt"
    if not first:
        models.save_checkpoint(_trained_like_model(), path, arch="resnet18", stem="imagenet",
                               config=CONFIG, metrics=METRICS)
    real, renamed = models.os.replace, []

    def replace(src, dst):
        real(src, dst)
        renamed.append(Path(dst).name)
        if Path(dst) == path:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(models.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        models.save_checkpoint(_trained_like_model(), path, arch="resnet18", stem="imagenet",
                               config=CONFIG, metrics={"test_accuracy": 0.5})
    monkeypatch.setattr(models.os, "replace", real)
    assert renamed == ["ckpt.pt.json"] * first + ["ckpt.pt", "ckpt.pt.json"]
    assert models.load_checkpoint(path).info.metrics == {"test_accuracy": 0.5}
    assert "pending" not in json.loads(models.sidecar_path(path).read_text())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt")) == \
        ["ckpt.pt", "ckpt.pt.json"]


def test_a_writer_records_the_sha256_of_its_own_weights_when_another_replaces_them(
        tmp_path, monkeypatch):
    """Two writers of one path: B saves its whole checkpoint between A's rename of its
    weights and A's hash. A hashed the path, so A returned, and wrote into the sidecar with
    A's config and metrics, the sha256 of B's weights: a run's record naming weights it did
    not train, and a sidecar that verifies them under A's metrics. Each writer now records
    the bytes it wrote; the pair left is refused, not misattributed."""
    path = tmp_path / "ckpt.pt"
    model_a, model_b = _trained_like_model(), fashion_resnet("resnet18", seed=9).eval()
    real, wrote = models.atomic_write, {}

    def then_b(target, write):
        out = real(target, write)
        if Path(target) == path and "a" not in wrote:
            wrote["a"] = sha256_file(path)  # A's weights, just renamed into place
            monkeypatch.setattr(models, "atomic_write", real)
            wrote["b"] = models.save_checkpoint(model_b, path, arch="resnet18", stem="imagenet",
                                                config={"writer": "B"}, metrics=METRICS)
        return out

    monkeypatch.setattr(models, "atomic_write", then_b)
    info_a = models.save_checkpoint(model_a, path, arch="resnet18", stem="imagenet",
                                    config={"writer": "A"}, metrics=METRICS)
    assert info_a.sha256 == wrote["a"] != wrote["b"].sha256 == sha256_file(path)
    sidecar = json.loads(models.sidecar_path(path).read_text())
    assert sidecar["sha256"] == info_a.sha256 and sidecar["config"] == {"writer": "A"}
    _refused(path, "does not match")

def test_a_name_that_leaves_no_room_for_its_sidecar_is_refused_before_anything_is_written(
        tmp_path):
    """``NAME.json`` must fit the file system's limit too: a name one byte too long for it
    is refused with the longest name that works (which then saves and loads); it failed
    with a raw "File name too long" on the sidecar."""
    limit = name_max(tmp_path)
    room = limit - len(models.SIDECAR_SUFFIX)
    long_one = tmp_path / ("b" * (room + 1 - len(".pt")) + ".pt")
    with pytest.raises(ValueError, match=f"its name is {room + 1} bytes, and its sidecar's .* "
                                         f"would be {limit + 1}, over the {limit} bytes .* "
                                         f"nothing was written. Save it under a name of at "
                                         f"most {room} bytes"):
        models.save_checkpoint(_trained_like_model(), long_one, arch="resnet18",
                               stem="imagenet", config=CONFIG, metrics=METRICS)
    assert not list(tmp_path.iterdir())
    fits = tmp_path / ("b" * (room - len(".pt")) + ".pt")
    saved = models.save_checkpoint(_trained_like_model(), fits, arch="resnet18",
                                   stem="imagenet", config=CONFIG, metrics=METRICS)
    assert models.load_checkpoint(fits).info.sha256 == saved.sha256
    assert sorted(name_bytes(p.name) for p in tmp_path.iterdir()) == [room, limit]


def test_memory_format_switches_the_layout_and_restores_each_tensor():
    """Inside the block every 4-D parameter and buffer is channels_last with the same values
    (the same Parameter objects); on exit each is back in its own memory, with what was
    written inside kept; the network's outputs agree with the contiguous ones to float
    rounding (other kernels, other summation orders). A STOCHASTIC forward is laid out
    contiguously, the others channels_last."""
    # zero_init_residual off: with it each block's last BatchNorm scales by 0, and 16 of the
    # 20 convolutions (every block's) add nothing to the outputs compared below (flipping
    # layer2.0.conv2's kernel moved them by 0.0; off, by 0.195)
    model = fashion_resnet("resnet18", seed=3, zero_init_residual=False).eval()
    params = dict(model.named_parameters())
    before = {n: (p.data_ptr(), p.stride(), p.detach().clone()) for n, p in params.items()}
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        with memory_format(model) as m:
            assert m is model
            conv = [p for p in model.parameters() if p.dim() == 4]
            assert conv and all(p.is_contiguous(memory_format=torch.channels_last)
                                for p in conv)
            # 1x1 kernels and one input channel are both layouts at once; the others moved
            assert all(not p.is_contiguous() for p in conv if p.shape[1] > 1 and
                       p.shape[2:].numel() > 1)
            assert all(torch.equal(p, before[n][2]) for n, p in params.items())
            got = model(x)
            assert got.shape == ref.shape
            model.conv1.weight.mul_(2)  # a value written inside the block
    # A stated tolerance, not a derived one: float32's worst case (γ_n = n·u of Σ|w||x| for
    # each reduction, n up to 3·3·512, carried through |W|, u = 2**-24) is vacuous here (0.04
    # at logits of at most 0.12 with the blocks' convolutions silenced, more without). Measured (seed 3, an AVX512-VNNI machine): the layouts differ by
    # at most 5.1e-7 (17.5 u of the largest logit), each within 6.2e-7 of a float64
    # evaluation. 1e-5 + 1e-4·|ref| (at most 5.9e-5) sits about 100 times above that and under
    # 1/3300 of the logits' sd (0.19): rounding passes, a fault that moves a logit visibly
    # does not.
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
    for n, p in params.items():
        assert (p.data_ptr(), p.stride()) == before[n][:2], n
        want = before[n][2] * 2 if n == "conv1.weight" else before[n][2]
        assert torch.equal(p, want), n
    assert forward_layout() is torch.channels_last
    assert forward_layout(RoundingMode.TOWARD_ZERO) is torch.channels_last
    assert forward_layout("stochastic") is forward_layout(" STOCHASTIC") \
        is torch.contiguous_format
    with pytest.raises(TypeError, match="torch.nn.Module"):
        with memory_format("resnet"):
            pass
    with pytest.raises(ValueError, match="4-D layouts"):
        with memory_format(model, torch.channels_last_3d):
            pass
    # an error inside the block: every tensor is back in its own memory all the same
    with pytest.raises(RuntimeError, match="inside"):
        with memory_format(model):
            raise RuntimeError("inside")
    for n, p in params.items():
        assert (p.data_ptr(), p.stride()) == before[n][:2], n


def test_a_folder_given_as_a_checkpoint_is_named_a_folder(tmp_path):
    """The advice for a missing file ("train one there with --checkpoint FOLDER") is
    refused by the training study when the path is a folder."""
    with pytest.raises(models.CheckpointError, match="is a folder, not a checkpoint file; "
                                                     "name a checkpoint file") as caught:
        models.load_checkpoint(tmp_path)
    assert not isinstance(caught.value, CheckpointNotFoundError)


def test_saving_to_a_folder_is_refused_before_anything_is_written(tmp_path):
    """save_checkpoint to a folder's path serialised the weights, then failed in os.replace
    naming its temporary file ('.m.pt.XXXXXXXX.tmp'), with a provisional m.pt.json left
    beside the folder; now an IsADirectoryError naming the folder, and nothing written."""
    (tmp_path / "m.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="a folder is where the checkpoint file goes: "
                                                "nothing was written") as caught:
        models.save_checkpoint(models.fashion_resnet("resnet18"), tmp_path / "m.pt",
                               arch="resnet18", stem="imagenet", config={}, metrics={})
    assert caught.value.filename == str(tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert not list((tmp_path / "m.pt").iterdir())


def test_a_stem_its_state_dict_cannot_tell_is_refused_by_save(tmp_path):
    """A CIFAR-stem network saved as conv3-pool (the same keys: a max-pool has none) loaded
    with a max-pool, and gave other logits."""
    cifar = models.fashion_resnet("resnet18", "cifar")
    with pytest.raises(models.StateDictMismatchError, match="stem"):
        models.save_checkpoint(cifar, tmp_path / "m.pt", arch="resnet18", stem="conv3-pool",
                               config={}, metrics={})
    assert not list(tmp_path.iterdir())
    models.save_checkpoint(cifar, tmp_path / "m.pt", arch="resnet18", stem="cifar",
                           config={}, metrics={})


STEM_CHANGES = {"max-pool 2x2": ("maxpool", torch.nn.MaxPool2d(2, 2)),
                "max-pool ceil_mode": ("maxpool", torch.nn.MaxPool2d(3, 2, 0, ceil_mode=True)),
                "dilated conv1": ("conv1", torch.nn.Conv2d(1, 64, 7, 2, 3, dilation=2,
                                                           bias=False))}


@pytest.mark.parametrize("change", list(STEM_CHANGES))
def test_a_stem_with_other_settings_is_refused_by_save(tmp_path, change):
    """The stem check compared conv1's kernel, stride and padding and the max-pool's type
    only: a max-pool of another size or ceil mode, or a dilated conv1, was saved as the
    ImageNet stem and loaded with that stem's layers (the ceil-mode and dilated ones gave
    logits 0.04 away from the model saved)."""
    name, layer = STEM_CHANGES[change]
    model = models.fashion_resnet("resnet18", "imagenet")
    setattr(model, name, layer)
    with pytest.raises(models.StateDictMismatchError,
                       match=f"another stem: its {name} is {re.escape(repr(layer))}"):
        models.save_checkpoint(model, tmp_path / "m.pt", arch="resnet18", stem="imagenet",
                               config={}, metrics={})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("given", ["small_cnn", "state_dict"])
def test_a_model_without_a_resnet_classifier_is_refused_by_save(tmp_path, given):
    """A model without ``fc`` (the small CNN, or a ResNet's state dict passed for the model)
    stopped with an AttributeError ("'Sequential' object has no attribute 'fc'") where the
    docstring promises a StateDictMismatchError and nothing written."""
    model = models.fashion_small_cnn() if given == "small_cnn" else \
        models.fashion_resnet("resnet18").state_dict()
    with pytest.raises(StateDictMismatchError, match="without a linear classifier fc, not a "
                                                     "fashion_resnet.*nothing was written"):
        models.save_checkpoint(model, tmp_path / "m.pt", arch="resnet18", stem="imagenet",
                               config={}, metrics={})
    assert not list(tmp_path.iterdir())

def test_a_negative_batchnorm_variance_is_refused():
    """It was loaded, and the network's output was not finite."""
    model = models.fashion_resnet("resnet18")
    state = model.state_dict()
    state["bn1.running_var"] = state["bn1.running_var"].clone()
    state["bn1.running_var"][3] = -1.0
    with pytest.raises(models.StateDictMismatchError, match="bn1.running_var"):
        models.check_state_dict(models.fashion_resnet("resnet18"), state, "the file")


def test_forward_layout_follows_qerror_layout_for_deterministic_passes(monkeypatch):
    from qerror import RoundingMode

    monkeypatch.delenv(models.LAYOUT_ENV, raising=False)
    assert models.forward_layout() is torch.channels_last
    assert models.forward_layout(RoundingMode.TOWARD_ZERO) is torch.channels_last
    monkeypatch.setenv(models.LAYOUT_ENV, "contiguous")
    assert models.forward_layout() is torch.contiguous_format
    assert models.forward_layout(RoundingMode.FLOOR) is torch.contiguous_format
    monkeypatch.setenv(models.LAYOUT_ENV, "channels_last")
    # random rounding copies a channels_last activation to C order and back: never
    assert models.forward_layout(RoundingMode.STOCHASTIC) is torch.contiguous_format
    monkeypatch.setenv(models.LAYOUT_ENV, "nhwc")
    with pytest.raises(ValueError, match="QERROR_LAYOUT='nhwc': expected one of"):
        models.forward_layout()


def test_the_command_a_refusal_gives_names_the_checkpoint_with_a_space_in_its_path(tmp_path):
    """A missing or damaged checkpoint is answered with `python -m studies.train ...
    --checkpoint PATH` to run; the path went in unquoted, and with a space in it the command
    named another file."""
    folder = tmp_path / "My Models"
    folder.mkdir()
    damaged = folder / "damaged.pt"
    models.save_checkpoint(models.fashion_resnet("resnet18"), damaged, arch="resnet18",
                           stem="imagenet", config={}, metrics={})
    damaged.write_bytes(damaged.read_bytes()[:-10])
    for path in (folder / "missing.pt", damaged):
        with pytest.raises(models.CheckpointError) as info:
            models.load_checkpoint(path, expected_arch="resnet18")
        argv = shlex.split(re.search(r"`(python -m studies\.train[^`]*)`",
                                     str(info.value)).group(1))
        assert argv[argv.index("--checkpoint") + 1] == str(path)
