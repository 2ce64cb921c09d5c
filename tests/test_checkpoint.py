"""Checkpoints: a directory of model.safetensors + config.json; no pickle; clear errors; atomic."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import protozoo
from protozoo.checkpoint import CONFIG, FORMAT_VERSION, WEIGHTS, load_state
from protozoo.errors import CheckpointError

from conftest import subprocess_env


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("class_names", ["cat", "dog", "<b>bird</b>"])
    model = protozoo.create_model("cam", backbone="tiny_cnn", **kwargs)
    with torch.no_grad():  # make every tensor, BN statistics included, non-default
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.uniform_(0.5, 1.5)
    model.metadata["note"] = "hello"
    return model.eval()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_round_trip_in_a_fresh_process(tmp_path):
    model = _model(extra_conv=8)
    protozoo.save(model, tmp_path / "ckpt", image_size=32)
    x = torch.randn(4, 3, 32, 40)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    with torch.no_grad():
        expected = model(x).logits
    code = ("import sys, torch, protozoo\n"
            "from safetensors.torch import load_file, save_file\n"
            "model = protozoo.load(sys.argv[1])\n"
            "assert not model.training\n"
            "x = load_file(sys.argv[2])['x']\n"
            "with torch.no_grad():\n"
            "    save_file({'logits': model(x).logits.contiguous()}, sys.argv[3])\n"
            "print(model.model_name, model.class_names, model.init_kwargs, model.metadata)\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt"),
                             str(tmp_path / "x.safetensors"), str(tmp_path / "out.safetensors")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr
    logits = load_file(str(tmp_path / "out.safetensors"))["logits"]
    assert torch.equal(logits, expected)
    # the arguments given and the constructor's defaults: the checkpoint pins both
    assert result.stdout.strip() == ("cam ['cat', 'dog', '<b>bird</b>'] {'backbone': 'tiny_cnn', "
                                     "'num_classes': None, 'pretrained': False, 'stage': -1, "
                                     "'extra_conv': 8} {'note': 'hello'}")


def test_round_trip_in_process_restores_every_tensor(tmp_path):
    model = _model()
    protozoo.save(model, tmp_path)
    loaded = protozoo.load(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    own, new = model.state_dict(), loaded.state_dict()
    assert own.keys() == new.keys()
    for key in own:
        assert torch.equal(own[key], new[key]), key
    # saving the loaded model again gives the same config (save -> load -> save is stable)
    protozoo.save(loaded, tmp_path / "again")
    assert (json.loads((tmp_path / CONFIG).read_text())
            == json.loads((tmp_path / "again" / CONFIG).read_text()))


def test_config_json_contents(tmp_path):
    model = _model(extra_conv=4)
    protozoo.save(model, tmp_path, image_size=48)
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["format_version"] == FORMAT_VERSION == 1
    assert config["model"] == "cam"
    assert config["kwargs"] == {"backbone": "tiny_cnn", "num_classes": None, "pretrained": False,
                                "stage": -1, "extra_conv": 4,
                                "class_names": ["cat", "dog", "<b>bird</b>"]}
    assert config["class_names"] == ["cat", "dog", "<b>bird</b>"]
    assert config["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert config["image_size"] == 48
    assert config["metadata"] == {"note": "hello"}
    import hashlib

    assert config["weights_sha256"] == hashlib.sha256((tmp_path / WEIGHTS).read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]


def test_checkpoint_keeps_its_model_when_a_default_changes(tmp_path, monkeypatch):
    """The config records the defaults the model was built with, so a later version's new
    default does not silently change a loaded model (han's ``unit_cells`` has no weights: only
    the recorded value tells the two models apart)."""
    from protozoo.models.hard_attention import HAN

    vocab = ["<pad>", "<unk>", "what", "colour"]
    model = protozoo.create_model("han", class_names=["a", "b"], vocab=vocab, g_dim=8, f_dim=8)
    assert model.unit_cells is True and model.init_kwargs["unit_cells"] is True
    protozoo.save(model, tmp_path)
    original = HAN.__init__

    def new_defaults(self, *args, unit_cells=False, **kwargs):  # a "later version"
        original(self, *args, unit_cells=unit_cells, **kwargs)

    monkeypatch.setattr(HAN, "__init__", new_defaults)
    assert protozoo.load(tmp_path).unit_cells is True


def test_pretrained_path_is_not_needed_to_load(tmp_path):
    weights = tmp_path / "bb.safetensors"
    state = protozoo.create_backbone("tiny_cnn").body.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    model = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=2,
                                  pretrained=str(weights))
    protozoo.save(model, tmp_path / "ckpt")
    weights.unlink()  # the checkpoint holds the weights; the original file is not read again
    loaded = protozoo.load(tmp_path / "ckpt")
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_load_never_unpickles(tmp_path, monkeypatch):
    model = _model()
    protozoo.save(model, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("protozoo.load must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = protozoo.load(tmp_path)
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_mismatched_architecture_names_the_mismatch(tmp_path):
    protozoo.save(_model(), tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    config["kwargs"]["extra_conv"] = 16  # the weights have no extra conv and a 128-wide fc
    (tmp_path / CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        protozoo.load(tmp_path)
    message = str(info.value)
    assert "2 missing (e.g. extra.0.bias)" in message
    assert "fc.weight: checkpoint (3, 128) vs model (3, 16)" in message
    assert "\n" not in message

    state = load_file(str(tmp_path / WEIGHTS))
    five = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=5)
    with pytest.raises(CheckpointError, match=r"2 with other shapes \(e.g. fc.weight: checkpoint "
                                              r"\(3, 128\) vs model \(5, 128\)\)"):
        load_state(five, state, source="x")
    state["extra_key"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e.g. extra_key\)"):
        load_state(_model(), state, source="x")


def test_replaced_weights_fail_the_hash_check(tmp_path):
    protozoo.save(_model(seed=0), tmp_path / "a")
    protozoo.save(_model(seed=1), tmp_path / "b")
    (tmp_path / "a" / WEIGHTS).write_bytes((tmp_path / "b" / WEIGHTS).read_bytes())
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        protozoo.load(tmp_path / "a")


def test_corrupted_weights_fail_the_hash_check(tmp_path):
    protozoo.save(_model(), tmp_path)
    data = bytearray((tmp_path / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside a tensor
    (tmp_path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match"):
        protozoo.load(tmp_path)


def test_missing_pieces_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        protozoo.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="has no config.json"):
        protozoo.load(tmp_path)
    protozoo.save(_model(), tmp_path / "ok")
    (tmp_path / "ok" / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="has config.json but no model.safetensors"):
        protozoo.load(tmp_path / "ok")


def test_bad_config_files_are_checkpoint_errors(tmp_path):
    protozoo.save(_model(), tmp_path)
    good = (tmp_path / CONFIG).read_text()
    (tmp_path / CONFIG).write_text(good[:-10])
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        protozoo.load(tmp_path)
    (tmp_path / CONFIG).write_text(good.replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(CheckpointError, match="format version 99"):
        protozoo.load(tmp_path)
    (tmp_path / CONFIG).write_text('{"format_version": 1}')
    with pytest.raises(CheckpointError, match="lacks model, kwargs, class_names"):
        protozoo.load(tmp_path)
    (tmp_path / CONFIG).write_text("[]")
    with pytest.raises(CheckpointError, match="lacks model"):
        protozoo.load(tmp_path)


def test_load_device_and_save_path_mistakes_are_user_errors(tmp_path):
    from protozoo.errors import UserError

    protozoo.save(_model(), tmp_path / "ok")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        protozoo.load(tmp_path / "ok", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is available"):
            protozoo.load(tmp_path / "ok", device="cuda")
    (tmp_path / "file.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="'.*file.txt' is a file; a checkpoint is a folder"):
        protozoo.save(_model(), tmp_path / "file.txt")
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_failed_weight_write_leaves_previous_checkpoint_untouched(tmp_path, monkeypatch):
    import safetensors.torch

    protozoo.save(_model(seed=0), tmp_path)
    before = _files(tmp_path)
    real = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # half-written file, then the "crash"
            handle.truncate(os.path.getsize(filename) // 2)
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        protozoo.save(_model(seed=1), tmp_path)
    assert _files(tmp_path) == before  # same names (no temp files left), same bytes
    monkeypatch.undo()
    torch.testing.assert_close(protozoo.load(tmp_path).fc.weight, _model(seed=0).fc.weight)


def test_failed_config_write_is_detected_on_load(tmp_path, monkeypatch):
    """Weights are replaced first; if the config write then fails, the stale config's hash no
    longer matches, so the mix of two versions is reported instead of loaded."""
    from protozoo import checkpoint

    protozoo.save(_model(seed=0), tmp_path)
    config_before = (tmp_path / CONFIG).read_bytes()

    def crash(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "atomic_write_text", crash)
    with pytest.raises(OSError):
        protozoo.save(_model(seed=1), tmp_path)
    assert (tmp_path / CONFIG).read_bytes() == config_before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]
    with pytest.raises(CheckpointError, match="does not match"):
        protozoo.load(tmp_path)


def test_atomic_path_cleans_up_on_error(tmp_path):
    from protozoo.fileio import atomic_path, atomic_write_text

    atomic_write_text(tmp_path / "f.txt", "old")
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("new but unfinished")
            raise ValueError("crash")
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    assert (tmp_path / "f.txt").read_text() == "old"


def test_atomic_files_get_ordinary_permissions(tmp_path):
    from protozoo.fileio import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644


def test_a_checkpoint_from_before_type_checks_loads_as_it_trained(tmp_path):
    """``--model-arg coordinates=False`` used to be saved as the string "False", which the model
    read as true: such a checkpoint loads as the model its weights belong to."""
    vocab = ["<pad>", "<unk>", "what"]
    model = protozoo.create_model("san", num_classes=2, vocab=vocab, coordinates=True)
    protozoo.save(model, tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    config["kwargs"]["coordinates"] = "False"  # what the earlier train.py wrote
    (tmp_path / CONFIG).write_text(json.dumps(config))
    loaded = protozoo.load(tmp_path)
    assert loaded.coordinates is True
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_a_han_saved_before_word_reads_existed_loads_without_them(tmp_path):
    """``split_film`` and ``word_reads`` became han's defaults after runs without them were
    saved: a config that lacks them (what train.py wrote before) loads as the model it trained,
    both off, not with today's defaults; a config that has them keeps its values."""
    vocab = ["<pad>", "<unk>", "what"]
    model = protozoo.create_model("han", num_classes=2, vocab=vocab, top_k=0.25,
                                  split_film=False, word_reads=False, g_dim=16, f_dim=16)
    protozoo.save(model, tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    for key in ("split_film", "word_reads"):
        del config["kwargs"][key]
    (tmp_path / CONFIG).write_text(json.dumps(config))
    loaded = protozoo.load(tmp_path)
    assert loaded.reader is None and not loaded.reasoner.split_film
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    fresh = protozoo.create_model("han", num_classes=2, vocab=vocab, g_dim=16, f_dim=16)
    protozoo.save(fresh, tmp_path / "now")
    again = protozoo.load(tmp_path / "now")
    assert again.reader is not None and again.reasoner.split_film
