"""protozoo as a library: ``protozoo.train`` / ``protozoo.evaluate`` on a user's own data, no
protozoo loader involved -- a ``torchvision.datasets.ImageFolder`` made here (3 classes x 24
images of 32 px, the class is the colour of a square), a ``DataLoader`` over it, and a
``TensorDataset`` -- through every phase of ProtoPNet (warm-up, push, joint, push, last layer,
prune, last layer) and CAM, then evaluated with the evidence report. Resume continues a killed
run (a pruned ProtoPNet is rebuilt in place)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import protozoo
from protozoo.engine import Trainer

tv = pytest.importorskip("torchvision")

SIZE, PER_CLASS, TEST_PER_CLASS = 32, 24, 6
COLOURS = {"blue": (40, 60, 230), "green": (30, 200, 40), "red": (230, 30, 30)}
PROTOPNET_PHASES = ["warm", "warm", "push_after_warm", "joint", "push", "last_layer",
                    "last_layer", "last_layer", "last_layer", "prune", "last_layer_after_prune",
                    "last_layer_after_prune", "last_layer_after_prune",
                    "last_layer_after_prune"]


def _picture(rng, colour) -> np.ndarray:
    image = rng.integers(90, 160, (SIZE, SIZE, 3), dtype=np.uint8)  # grey noise
    side = int(rng.integers(9, 13))
    x, y = rng.integers(0, SIZE - side, 2)
    image[y:y + side, x:x + side] = colour
    return image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``root/{train,test}/<colour>/*.png``: the cue is the colour of a square anywhere."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", PER_CLASS), ("test", TEST_PER_CLASS)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(_picture(rng, colour)).save(root / split / name / f"{i:02d}.png")
    return root


def _image_folders(root, model):
    tf = tv.transforms.Compose([tv.transforms.ToTensor(),
                                tv.transforms.Normalize(model.mean, model.std)])
    return (tv.datasets.ImageFolder(root / "train", transform=tf),
            tv.datasets.ImageFolder(root / "test", transform=tf))


def _protopnet():
    torch.manual_seed(0)
    return protozoo.create_model("protopnet", backbone="tiny_cnn_rf10", num_classes=3,
                                 prototypes_per_class=2)


def test_cam_trains_from_a_dataloader_and_reports(folder, tmp_path):
    torch.manual_seed(0)
    model = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=3)
    train_ds, test_ds = _image_folders(folder, model)
    loader = DataLoader(train_ds, batch_size=16, shuffle=True)
    history = protozoo.train(model, loader, epochs=3, lr=3e-3)  # batch size: the loader's
    assert [r["phase"] for r in history] == ["train"] * 3
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    metrics = protozoo.evaluate(model, DataLoader(test_ds), report_dir=tmp_path / "rep")
    assert metrics["accuracy"] > 0.5  # chance 1/3
    assert "CAM report" in (tmp_path / "rep" / "index.html").read_text()
    assert (tmp_path / "rep" / "cams.png").is_file()


@pytest.mark.parametrize("family", ["cam", "protopnet"])
def test_a_tensor_dataset_trains_and_reports(family, tmp_path):
    """No files, no class names, no raw images: paths are synthetic and the report draws the
    denormalised input."""
    torch.manual_seed(0)
    model = _protopnet() if family == "protopnet" else protozoo.create_model(
        "cam", backbone="tiny_cnn", num_classes=3)
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 16)
    pixels = np.stack([_picture(rng, list(COLOURS.values())[k]) for k in labels])
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    images = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    data = TensorDataset(images, torch.from_numpy(labels))
    history = protozoo.train(model, data, epochs=1, batch_size=64)
    assert history and model.class_names == ["0", "1", "2"]
    metrics = protozoo.evaluate(model, data, push_data=data, report_dir=tmp_path / "rep")
    assert metrics["num_test_images"] == 48
    assert (tmp_path / "rep" / "index.html").is_file()
    if family == "protopnet":
        assert metrics["prototypes_at_source"] == 1.0
        assert all(r["image_path"].startswith("TensorDataset[")
                   for r in model.metadata["prototypes"])


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, phase: str) -> None:
    """Make the engine stop right after the checkpoint that follows ``phase``."""
    original = Trainer._checkpoint

    def checkpoint_then_die(self, position, *args):
        original(self, position, *args)
        done = self.phases[position["phase"] - 1].name if position["epoch"] == 0 else \
            self.phases[position["phase"]].name
        if done == phase and not position.get("finished"):
            raise _Killed

    monkeypatch.setattr(Trainer, "_checkpoint", checkpoint_then_die)


def test_protopnet_on_an_image_folder_killed_resumed_evaluated_and_reported(folder, tmp_path,
                                                                              monkeypatch):
    """Every phase from Python; killed right after pruning, continued with a fresh model
    (rebuilt in place to the pruned one); then evaluated with its evidence report."""
    model = _protopnet()
    train_ds, test_ds = _image_folders(folder, model)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _kill_after(patch, "prune")
        with pytest.raises(_Killed):
            protozoo.train(model, train_ds, epochs=1, batch_size=64, run_dir=run)
    assert model.class_names == ["blue", "green", "red"]  # taken from ImageFolder.classes
    pruned_to = model.num_prototypes

    fresh = _protopnet()  # 6 prototypes
    with pytest.raises(protozoo.UserError, match=r"epochs=2 differs from its 1"):
        protozoo.train(fresh, train_ds, epochs=2, batch_size=64, run_dir=run, resume=True)
    history = protozoo.train(fresh, train_ds, epochs=1, batch_size=64, run_dir=run,
                             resume=True)
    assert [r["phase"] for r in history] == PROTOPNET_PHASES
    pruned = history[PROTOPNET_PHASES.index("prune")]["prune/pruned"]
    assert fresh.num_prototypes == pruned_to == 6 - pruned
    assert fresh.prototypes.shape[0] == len(fresh.metadata["prototypes"]) == pruned_to
    assert fresh.class_names == ["blue", "green", "red"]
    # the push set is the training part of the folder: provenance names its files
    sources = {r["image_path"] for r in fresh.metadata["prototypes"]}
    assert sources <= {path for path, _ in train_ds.samples}
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["dataset"] == "python:ImageFolder" and saved["image_size"] == SIZE
    assert (run / "curves.png").is_file() and (run / "log.jsonl").is_file()
    again = protozoo.train(fresh, train_ds, epochs=1, batch_size=64, run_dir=run, resume=True)
    assert again == history  # finished: nothing to do, the history as it was

    metrics = protozoo.evaluate(fresh, test_ds, push_data=train_ds, report_dir=tmp_path / "rep")
    assert metrics["num_test_images"] == 3 * TEST_PER_CLASS and 0 <= metrics["accuracy"] <= 1
    # every prototype is found again, by file, in the whole folder given as push_data
    assert metrics["prototypes_at_source"] == 1.0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "Evidence report" in page and (tmp_path / "rep" / "prototypes.html").is_file()
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text()) == metrics

    loaded = protozoo.load(run)
    x = torch.stack([test_ds[i][0] for i in range(4)])
    torch.testing.assert_close(loaded(x).logits, fresh.eval()(x).logits)


def test_an_image_folder_without_transforms_is_a_one_line_error(folder, tmp_path):
    with pytest.raises(protozoo.UserError, match=r"train_data item 0: 'image' is a PIL image; "
                                                 r"it must be a float tensor \[3, S, S\] .*add "
                                                 r"transforms.ToTensor\(\) then "
                                                 r"transforms.Normalize\(model.mean, model.std\)"):
        protozoo.train(_protopnet(), tv.datasets.ImageFolder(folder / "train"),
                       run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
