"""Model and backbone registries: lookup, close-match errors, double registration."""
from __future__ import annotations

import pytest

import protozoo
from protozoo.backbones import create_backbone
from protozoo.errors import UserError
from protozoo.models.cam import CAMNet
from protozoo.registry import MODELS, Registry, register_model


def test_unknown_model_names_close_match():
    with pytest.raises(UserError) as info:
        protozoo.create_model("camm", num_classes=3)
    message = str(info.value)
    assert "camm" in message and "did you mean" in message and "cam" in message.split("did")[1]
    assert "\n" not in message


def test_unknown_model_without_close_match_lists_choices():
    with pytest.raises(UserError) as info:
        protozoo.create_model("zzzzzz", num_classes=3)
    assert "choose one of" in str(info.value) and "cam" in str(info.value)


def test_unknown_builtin_backbone_names_close_match():
    with pytest.raises(UserError) as info:
        create_backbone("tiny_cnnn")
    assert "did you mean" in str(info.value) and "tiny_cnn" in str(info.value)


def test_unknown_timm_backbone_through_create_model():
    with pytest.raises(UserError) as info:
        protozoo.create_model("cam", backbone="resnt18", num_classes=3)
    message = str(info.value)
    assert "unknown backbone 'resnt18'" in message
    assert "resnet18" in message.split("did you mean")[1]


def test_register_twice_raises_and_keeps_first():
    with pytest.raises(ValueError, match="already registered"):
        register_model("cam")(lambda **kw: None)
    assert MODELS.get("cam") is CAMNet

    reg = Registry("widget")
    reg.register("a")(len)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(abs)
    assert reg.get("a") is len and reg.names() == ["a"] and "a" in reg and "b" not in reg


def test_create_model_records_name_and_kwargs():
    model = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=4, extra_conv=8)
    assert isinstance(model, CAMNet)
    assert model.model_name == "cam"
    # the given arguments and the constructor's defaults for the rest
    assert model.init_kwargs == {"backbone": "tiny_cnn", "num_classes": 4, "pretrained": False,
                                 "stage": -1, "class_names": None, "extra_conv": 8}
    assert model.num_classes == 4 and model.class_names == ["0", "1", "2", "3"]
    # the recorded kwargs are a copy: later edits by the caller do not leak in
    kwargs = {"backbone": "tiny_cnn", "class_names": ["a", "b"]}
    other = protozoo.create_model("cam", **kwargs)
    kwargs["backbone"] = "small_cnn"
    assert other.init_kwargs["backbone"] == "tiny_cnn"
    assert other.config() == {"backbone": "tiny_cnn", "num_classes": None, "pretrained": False,
                              "stage": -1, "class_names": ["a", "b"], "extra_conv": 0}


def test_class_names_and_num_classes_must_agree():
    with pytest.raises(ValueError, match="num_classes=3 but 2 class_names"):
        protozoo.create_model("cam", num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="give num_classes or class_names"):
        protozoo.create_model("cam")


def test_list_models_and_backbones():
    assert "cam" in protozoo.list_models()
    assert protozoo.list_models() == sorted(protozoo.list_models())
    backbones = protozoo.list_backbones()
    builtins = ["rn_cnn", "rn_cnn_rgb", "small_cnn", "tiny_cnn", "tiny_cnn_rf10", "tiny_cnn_s4"]
    assert backbones[:6] == builtins  # built-ins first, then timm's
    assert {"resnet18", "convnext_tiny"} <= set(backbones)
    assert protozoo.list_backbones(timm_models=False) == builtins


def test_create_model_checks_argument_names_and_types():
    with pytest.raises(UserError, match="model 'cam' has no argument 'extra_convv': did you "
                                        "mean extra_conv"):
        protozoo.create_model("cam", backbone="tiny_cnn", num_classes=3, extra_convv=8)
    # "False" is a true string: a bool argument must be a bool, an int one an int
    with pytest.raises(UserError, match="argument 'coordinates' of model 'san' must be true or "
                                        "false, got 'False'"):
        protozoo.create_model("san", num_classes=3, vocab=["<pad>", "<unk>"], coordinates="False")
    with pytest.raises(UserError, match="argument 'hops' of model 'san' must be int, got 2.5"):
        protozoo.create_model("san", num_classes=3, vocab=["<pad>", "<unk>"], hops=2.5)
    # ints are floats, lists stand for tuples (JSON has no tuples), None where allowed
    model = protozoo.create_model("han", num_classes=3, vocab=["<pad>", "<unk>"], top_k=3,
                                  glimpse=1)
    assert model.top_k == 3 and model.glimpse == 1


def test_model_tasks():
    from protozoo.registry import model_task, models_for_task

    assert models_for_task("vqa") == ["cnn_lstm", "han", "rn", "san"]
    assert model_task("protopnet") == model_task("cam") == model_task("niwt") == "classify"
