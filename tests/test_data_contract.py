"""The data contract (protozoo.data.contract) and every user mistake in the Python API: a one-line
UserError naming the item, the field and the fix, raised before any training (no run folder,
no weight moved). Also register_dataset and the images' own size for --dataset folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import protozoo
import train
from protozoo.data import DATASET_REGISTRY, build_data
from protozoo.data.contract import ContractDataset, adapt, check_samples

SIZE = 16


def _model(family="cam", classes=3):
    torch.manual_seed(0)
    if family == "protopnet":
        return protozoo.create_model("protopnet", backbone="tiny_cnn_rf10", num_classes=classes,
                                     prototypes_per_class=1)
    return protozoo.create_model("cam", backbone="tiny_cnn", num_classes=classes)


def _tensors(n=12, classes=3, size=SIZE, channels=3):
    torch.manual_seed(1)
    return torch.randn(n, channels, size, size), torch.arange(n) % classes


class Items(Dataset):
    """A list of ready-made items."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _dicts(n=12, **extra):
    images, labels = _tensors(n)
    return Items([{"image": images[i], "label": int(labels[i]), **extra} for i in range(n)])


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(3, SIZE, SIZE), 0


def _mixed_sizes():
    images, labels = _tensors()
    items = [(images[i], int(labels[i])) for i in range(12)]
    items[11] = (torch.randn(3, SIZE + 4, SIZE + 4), 2)
    return Items(items)


MISTAKES = [  # (train_data, train() kwargs, the message)
    (TensorDataset(*_tensors(channels=1)), {}, r"train_data item 0: 'image' has 1 channel\(s\) "
     r"\(shape 1x16x16\); the models take RGB \[3, S, S\]: give 3 channels"),
    (TensorDataset(torch.randn(12, SIZE, SIZE, 3), _tensors()[1]), {},
     r"has 16 channel\(s\).*permute it to \[3, H, W\]"),
    (TensorDataset((torch.rand(12, 3, SIZE, SIZE) * 255).byte(), _tensors()[1]), {},
     r"'image' is torch.uint8; it must be float and normalised .*transforms.ToTensor\(\)"),
    (TensorDataset(torch.randn(12, 3, SIZE, SIZE + 8), _tensors()[1]), {},
     r"'image' is 16x24 \(HxW\), not square"),
    (TensorDataset(torch.randn(12, 1, 3, SIZE, SIZE), _tensors()[1]), {},
     r"has shape \[1, 3, 16, 16\]; it must be \[3, S, S\] \(one image, not a batch\)"),
    (_mixed_sizes(), {}, r"train_data item 11: 'image' is 3x20x20 but the first item's is "
     r"3x16x16: resize every image to one size"),
    (Items([{"image": torch.randn(3, SIZE, SIZE)}] * 6), {},
     r"train_data item 0 has no 'label': a sample is \(image, label\)"),
    (Items([{"picture": torch.randn(3, SIZE, SIZE), "label": 0}] * 6), {},
     r"train_data item 0 has no 'image'"),
    (Items([(torch.randn(3, SIZE, SIZE), 0, "x")] * 6), {},
     r"train_data item 0 is a tuple of 3 values: a tuple sample is \(image, label\)"),
    (Items([torch.randn(3, SIZE, SIZE)] * 6), {}, r"train_data item 0 is a Tensor"),
    (Items([(torch.randn(3, SIZE, SIZE), torch.tensor([0.0, 1.0, 0.0]))] * 6), {},
     r"'label' is tensor.*a label is an int class index .*not a one-hot vector"),
    (TensorDataset(_tensors()[0], _tensors()[1] + 1), {},
     r"train_data item 2 has label 3 but the model has 3 classes \(0..2\): build the model "
     r"with num_classes=4, or fix the labels"),
    (_dicts(mask=torch.ones(SIZE, SIZE)), {},
     r"'mask' is 16x16; it must be a float tensor \[1, 16, 16\]"),
    (_dicts(note=None), {}, r"'note' is None, which cannot be batched"),
    (Stream(), {}, r"train_data is an IterableDataset"),
    ([1, 2, 3], {}, r"train_data item 0 is an int: a sample is \(image, label\)"),
    (TensorDataset(*_tensors()), dict(schedule="fast"),
     r"model 'cam' has no schedule 'fast': use one of auto"),
    (TensorDataset(*_tensors()), dict(epochs=0), r"'epochs' in protozoo.train\(\) must be >= 1"),
    (TensorDataset(*_tensors()), dict(amp="fp8"), r"'amp' in protozoo.train\(\) must be one of"),
    (TensorDataset(*_tensors()), dict(val_fraction=1.0), r"val_fraction=1.0 must be between"),
    (TensorDataset(*_tensors()), dict(loss_weights={"cluster": 0.8}),
     r"model 'cam' has no loss term cluster"),
    (TensorDataset(*_tensors()), dict(resume=True), r"run' is not a run folder \(no "
     r"train_config.json\); pass the run_dir of an earlier protozoo.train run"),
    (TensorDataset(*_tensors()), dict(push_data=TensorDataset(*_tensors(n=6))),
     r"push_data must hold train_data's items in the same order"),
    (TensorDataset(*_tensors()), dict(val_data=TensorDataset(*_tensors(size=20))),
     r"val_data's images are 20 px but train_data's are 16 px"),
]


@pytest.mark.parametrize("data, kwargs, message", MISTAKES)
def test_every_mistake_is_one_line_before_any_training(data, kwargs, message, tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(protozoo.UserError, match=message) as err:
        protozoo.train(model, data, run_dir=tmp_path / "run", **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_and_data_that_do_not_go_together():
    images, labels = _tensors()
    bundle = build_data("digits", num_train=60, num_test=20)
    with pytest.raises(protozoo.UserError, match="train_data is a DataBundle, which holds its "
                                                 "own val and push splits"):
        protozoo.train(_model(classes=10), bundle, val_data=TensorDataset(images, labels))
    with pytest.raises(protozoo.UserError, match=r"the model has 3 classes but train_data has "
                                                 r"10"):
        protozoo.train(_model(), bundle)
    folder_like = TensorDataset(images, labels)
    folder_like.classes = ["a", "b", "c", "d"]
    with pytest.raises(protozoo.UserError, match=r"train_data has 4 classes \(a, b, c, d\) but "
                                                 r"the model has 3: build the model with "
                                                 r"num_classes=4"):
        protozoo.train(_model(), folder_like)
    with pytest.raises(protozoo.UserError, match=r"model is a Linear: give a zoo model"):
        protozoo.train(torch.nn.Linear(2, 2), folder_like)
    san = protozoo.create_model("san", vocab=["<pad>", "<unk>", "red"], num_classes=3)
    with pytest.raises(protozoo.UserError, match=r"train_data item 0 has no 'question': a VQA "
                                                 r"model needs 'question'"):
        protozoo.train(san, TensorDataset(images, labels))


def test_evaluate_mistakes():
    images, labels = _tensors()
    model = _model("protopnet")
    with pytest.raises(protozoo.UserError, match=r"report shows the training images .*pass "
                                                 r"push_data=train_data"):
        protozoo.evaluate(model, TensorDataset(images, labels), report_dir="unused")
    with pytest.raises(protozoo.UserError, match=r"test_data item 0: 'image' has 1 channel"):
        protozoo.evaluate(model, TensorDataset(images[:, :1], labels))
    named = TensorDataset(images, labels)
    named.classes = ["x", "y", "z"]
    model.class_names = ["a", "b", "c"]
    with pytest.raises(protozoo.UserError, match=r"class 0 is 'a' in the model but 'x' in "
                                                 r"test_data"):
        protozoo.evaluate(model, named)


def test_an_unregistered_family_cannot_train_or_save(tmp_path):
    class Mine(protozoo.models.cam.CAMNet):
        pass

    model = Mine(num_classes=3)
    assert model.model_name == "" and model.init_kwargs["num_classes"] == 3
    with pytest.raises(protozoo.UserError, match=r"model class Mine is not registered: "
                                                 r"register it with @protozoo.register_model"):
        protozoo.train(model, TensorDataset(*_tensors()))
    with pytest.raises(protozoo.UserError, match=r"model class Mine is not registered"):
        protozoo.save(model, tmp_path / "mine")


# ----------------------------------------------------------------------------- the adapter
def test_the_adapter_reads_labels_paths_and_classes_without_decoding(tmp_path):
    images, labels = _tensors()
    data = adapt(DataLoader(TensorDataset(images, labels), batch_size=4), "train_data")
    assert isinstance(data, ContractDataset) and data.labels == labels.tolist()
    check_samples(data, "train_data", 3)
    assert data.image_size == SIZE and not data.has_masks and not data.has_boxes
    item = data[5]
    assert set(item) == {"image", "label", "index", "path"} and item["path"] == \
        "TensorDataset[5]"
    view = data.subset([5, 7])
    assert view.paths == ["TensorDataset[5]", "TensorDataset[7]"] and view.labels == [2, 1]
    assert view[0]["index"] == 0 and torch.equal(view[1]["image"], images[7])
    raw = view.raw_image(0)  # denormalised with the model's mean/std (default 0.5, 0.5)
    assert raw.dtype == np.uint8 and raw.shape == (SIZE, SIZE, 3)
    masked = adapt(_dicts(mask=torch.ones(1, SIZE, SIZE), box=torch.tensor([0., 0., 4., 4.]),
                          raw_image=np.full((SIZE, SIZE, 3), 7, np.uint8)), "d")
    check_samples(masked, "d", 3)
    assert masked.has_masks and masked.has_boxes and (masked.raw_image(3) == 7).all()
    assert masked.labels == [i % 3 for i in range(12)]  # read from the items: no attribute


def test_a_registered_data_source_is_one_entry(tmp_path, monkeypatch, capsys):
    """A loader returning plain TensorDatasets trains through the command line."""
    def blobs(args):
        images, labels = _tensors(n=30, size=args["image_size"] or 24)
        return TensorDataset(images, labels), TensorDataset(images[:9], labels[:9])

    protozoo.register_dataset("blobs-for-tests", blobs, image_size=24)
    try:
        assert "blobs-for-tests" in protozoo.list_datasets()
        with pytest.raises(ValueError, match="dataset 'blobs-for-tests' is already registered"):
            protozoo.register_dataset("blobs-for-tests", blobs)
        bundle = build_data("blobs-for-tests")
        assert bundle.image_size == 24 and len(bundle.train) + len(bundle.val) == 30
        assert bundle.class_names == ["0", "1", "2"]
        monkeypatch.chdir(tmp_path)
        assert train.main(["--model", "cam", "--backbone", "tiny_cnn", "--dataset",
                           "blobs-for-tests", "--epochs", "1", "--out", "run"]) == 0
        assert json.loads((tmp_path / "run" / "metrics.json").read_text())[
            "num_test_images"] == 9
    finally:
        DATASET_REGISTRY.unregister("blobs-for-tests")


# ----------------------------------------------------------------------------- image sizes
def _folder(root, sizes):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_a_folder_keeps_its_images_own_size(tmp_path, monkeypatch, capsys):
    root = _folder(tmp_path / "same", [(20, 20)] * 4)
    assert build_data("folder", data_dir=root).image_size == 20
    assert build_data("folder", data_dir=root, image_size=12).image_size == 12
    monkeypatch.chdir(tmp_path)
    assert train.main(["--model", "cam", "--backbone", "tiny_cnn", "--dataset", "folder",
                       "--data-dir", str(root), "--epochs", "1", "--out", "run",
                       "--no-report"]) == 0
    assert "images: 20 px, the dataset's own size (--image-size S resizes them" in \
        capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["image_size"] == 20


@pytest.mark.parametrize("sizes, message", [
    ([(20, 20), (20, 20), (24, 24)], r"are not all one size \(20x20, 24x24, 2 sizes in all\): "
     r"pass --image-size S"),
    ([(24, 16)] * 2, r"are 24x16, not square: pass --image-size S"),
])
def test_a_folder_of_other_sizes_asks_for_one(tmp_path, sizes, message):
    root = _folder(tmp_path / "data", sizes)
    with pytest.raises(protozoo.DataError, match=message):
        build_data("folder", data_dir=root)
    assert build_data("folder", data_dir=root, image_size=8).image_size == 8


def test_built_in_data_from_python():
    """A DataBundle of protozoo's own loaders trains and evaluates from Python too."""
    model = _model(classes=10)
    bundle = build_data("digits", num_train=60, num_test=20, mean=model.mean, std=model.std)
    history = protozoo.train(model, bundle, epochs=1)
    assert [r["phase"] for r in history] == ["train"]
    metrics = protozoo.evaluate(model, bundle)
    assert metrics["num_test_images"] == len(bundle.test)
    with pytest.raises(protozoo.UserError, match="holds its own push split: drop push_data"):
        protozoo.evaluate(model, bundle, push_data=bundle.push)
