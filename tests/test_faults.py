"""Fault injection (issue 27): every probe of a hostile user ends in one ``error:`` line with
exit status 2 that names the problem and the fix, leaves no half-written run folder and no
temporary file, and leaves a way on. Each test names the item of the issue it reproduces.

Faults are injected the cheap way: a full disk by a writer patched to raise ENOSPC (or torch's
own RuntimeError), a kill by a subprocess that SIGKILLs itself inside ``os.replace``, a
read-only folder by ``chmod`` (or, as root, where chmod does not bind, by ``os.open`` patched to
refuse writes there).
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate
import protozoo
import train
from conftest import ROOT, subprocess_env
from protozoo.errors import run_cli

FAST = ["--model", "cam", "--backbone", "tiny_cnn", "--dataset", "digits", "--num-train", "60",
        "--no-report"]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


def _train(argv) -> int:
    return run_cli(train.main, argv)


# ----------------------------------------------------------------------------- 1. NaN / inf
@pytest.mark.parametrize("flags", [
    ["--lr", "nan"], ["--lr", "inf"], ["--lr", "1e999"], ["--weight-decay", "nan"],
    ["--val-fraction", "nan"], ["--loss-weight", "cross_entropy=NaN"],
    ["--loss-weight", "cross_entropy=Infinity"], ["--model-arg", "extra_conv=NaN"],
], ids=lambda f: " ".join(f))
def test_1_nan_and_inf_are_rejected_for_every_float_option(tmp_path, monkeypatch, capsys, flags):
    monkeypatch.chdir(tmp_path)
    assert _train(FAST + flags + ["--epochs", "1", "--out", "run"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "must be a finite number" in line and "nan and inf" in line
    assert list(tmp_path.iterdir()) == []


def test_1_nan_in_a_yaml_file_and_in_an_edited_run_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("lr: .nan\n")
    assert _train(FAST + ["--config", "c.yaml", "--out", "run"]) == 2
    assert "'lr' in c.yaml must be a finite number" in _one_error_line(capsys.readouterr().err)
    run = tmp_path / "edited"
    run.mkdir()
    protozoo.config.TrainConfig(model="cam", dataset="digits").save(run / "train_config.json")
    config = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**config, "lr": float("nan")}))
    assert _train(["--resume", "edited"]) == 2
    assert "edited/train_config.json must be a finite number" in \
        _one_error_line(capsys.readouterr().err).replace("'lr' in ", "")
    assert _names(tmp_path) == ["c.yaml", "edited"] and _names(run) == ["train_config.json"]


# ----------------------------------------------------------------------------- 2. no dead end
def _nan_loss(monkeypatch):
    real = protozoo.losses.cross_entropy

    def diverging(logits, labels):  # NaN once training steps (the dry run has no gradients)
        loss = real(logits, labels)
        return loss * float("nan") if torch.is_grad_enabled() else loss

    monkeypatch.setattr(protozoo.losses, "cross_entropy", diverging)


def test_2_a_run_that_diverges_before_its_first_checkpoint_is_removed(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    _nan_loss(monkeypatch)
    assert _train(FAST + ["--epochs", "1", "--out", "run"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "loss became nan" in line and "lower --lr" in line
    assert "the run folder 'run' was removed (it had no checkpoint yet)" in line
    assert list(tmp_path.iterdir()) == []


def test_2_an_interrupted_first_epoch_is_removed_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(protozoo.engine.Trainer, "_train_epoch", interrupted)
    assert _train(FAST + ["--epochs", "1", "--out", "run"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("interrupted: the run folder 'run' was removed (it had no checkpoint yet): "
                   "start the run again")
    assert list(tmp_path.iterdir()) == []


def test_2_divergence_after_a_checkpoint_keeps_the_saved_epochs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real = protozoo.losses.cross_entropy
    epochs = {"n": 0}
    real_epoch = protozoo.engine.Trainer._train_epoch

    def count(self, *args, **kwargs):
        epochs["n"] += 1
        return real_epoch(self, *args, **kwargs)

    def diverging(logits, labels):
        loss = real(logits, labels)
        return loss * float("nan") if torch.is_grad_enabled() and epochs["n"] == 2 else loss

    monkeypatch.setattr(protozoo.engine.Trainer, "_train_epoch", count)
    monkeypatch.setattr(protozoo.losses, "cross_entropy", diverging)
    assert _train(FAST + ["--epochs", "2", "--out", "run"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "loss became nan in phase 'train' (epoch 2)" in line
    assert "the epochs before are saved in 'run'" in line and "another --out" in line
    assert "train_state.pt" in _names(tmp_path / "run") and not _temps(tmp_path)
    assert ".lock" not in _names(tmp_path / "run")


KILL_SCRIPT = """
import os, signal, sys
import protozoo.fileio as fileio
target, nth = sys.argv[1], int(sys.argv[2])
real = os.replace
seen = {"n": 0}
def replace(src, dst, *a, **k):
    if os.path.basename(str(dst)) == target:
        seen["n"] += 1
        if seen["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)  # a kill -9 in the middle of the write
    return real(src, dst, *a, **k)
fileio.os.replace = replace
import train
from protozoo.errors import run_cli
sys.exit(run_cli(train.main, sys.argv[3:]))
"""


def _killed_run(tmp_path: Path, target: str, nth: int, epochs: int) -> Path:
    """A run SIGKILLed during the ``nth`` atomic write of ``target``; returns its folder."""
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, target, str(nth), *FAST,
                             "--epochs", str(epochs), "--out", str(run)], cwd=tmp_path,
                            env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    return run


@pytest.mark.parametrize("target", ["train_config.json", "model.safetensors", "config.json",
                                    "train_state.pt"])
def test_2_a_run_killed_before_its_first_checkpoint_starts_over_in_place(tmp_path, monkeypatch,
                                                                        capsys, target):
    run = _killed_run(tmp_path, target, 1, epochs=1)
    assert "train_state.pt" not in _names(run) and ".lock" in _names(run)
    assert _temps(run)  # what the kill left mid-write
    monkeypatch.chdir(tmp_path)
    assert _train(["--resume", "run"]) == 2  # --resume names the way on ...
    line = _one_error_line(capsys.readouterr().err)
    assert ("has no train_state.pt" in line or "holds no train_config.json" in line) \
        and "again with --out run" in line
    assert _train(FAST + ["--epochs", "1", "--out", "run"]) == 0  # ... which works
    assert "held no checkpoint" in capsys.readouterr().out
    assert not _temps(run) and ".lock" not in _names(run)
    assert {"train_state.pt", "model.safetensors", "config.json"} <= set(_names(run))


# ----------------------------------------------------------------------------- 3. full disk
def _full_disk_on_save(monkeypatch, nth: int, as_torch: bool = False):
    """torch.save fails on its ``nth`` call as on a full disk (OSError ENOSPC, or torch's own
    RuntimeError as its writer raises it, with the disk reported full)."""
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            Path(f).write_bytes(b"half")  # a partial temporary file, as a real failure leaves
            if as_torch:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    if as_torch:
        import shutil
        from collections import namedtuple

        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))


@pytest.mark.parametrize("as_torch", [False, True], ids=["OSError", "torch RuntimeError"])
def test_3_a_full_disk_at_the_second_state_write_keeps_the_first(tmp_path, monkeypatch, capsys,
                                                                as_torch):
    monkeypatch.chdir(tmp_path)
    _full_disk_on_save(monkeypatch, 2, as_torch)
    assert _train(FAST + ["--epochs", "2", "--out", "run"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot write 'run/train_state.pt' (No space left on device)" in line
    assert "free some disk space" in line and "continue it with --resume run" in line
    run = tmp_path / "run"
    assert not _temps(run) and ".lock" not in _names(run)
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["position"]["global_epoch"] == 1
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert _train(["--resume", "run"]) == 0  # the way on works once there is space


def test_3_a_full_disk_at_the_first_state_write_leaves_no_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _full_disk_on_save(monkeypatch, 1)
    assert _train(FAST + ["--epochs", "1", "--out", "run"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "(No space left on device)" in line and "was removed" in line
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 4. edited files
@pytest.fixture
def bare(tmp_path):
    model = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=10)
    return protozoo.save(model, tmp_path / "bare")


def test_4_config_json_whose_class_count_disagrees(bare, capsys):
    config = json.loads((bare / "config.json").read_text())
    config["kwargs"]["num_classes"] = 5
    (bare / "config.json").write_text(json.dumps(config))
    before = _names(bare)
    assert run_cli(evaluate.main, [str(bare), "--dataset", "digits"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "config.json' does not describe a model that can be built (num_classes=5 but 10 " \
           "class_names given)" in line and "restore it" in line
    assert _names(bare) == before


def test_4_truncated_weights_without_a_hash(bare, capsys):
    config = json.loads((bare / "config.json").read_text())
    del config["weights_sha256"]
    (bare / "config.json").write_text(json.dumps(config))
    weights = bare / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert run_cli(evaluate.main, [str(bare), "--dataset", "digits"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "model.safetensors' cannot be read" in line and "truncated or damaged" in line
    assert _names(bare) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------- 5. read-only
def _read_only(folder: Path, monkeypatch) -> None:
    """Make ``folder`` refuse new files: chmod, or as root (where chmod does not bind) os.open
    and mkdir patched to refuse writes inside it."""
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return
    inside = str(folder.resolve()) + os.sep
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path):
        if os.path.abspath(os.fspath(path)).startswith(inside):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def open_(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)


def test_5_an_out_folder_that_is_not_writable(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir()
    _read_only(tmp_path / "ro", monkeypatch)
    try:
        assert _train(FAST + ["--epochs", "1", "--out", "ro"]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "cannot write in the run folder 'ro' (Permission denied)" in line
        assert "chmod u+w ro" in line and "choose another --out" in line
        assert _names(tmp_path / "ro") == []
    finally:
        (tmp_path / "ro").chmod(0o755)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "run"
    assert train.main(FAST + ["--epochs", "1", "--out", str(run)]) == 0
    return run


def test_5_evaluate_on_a_read_only_run_fails_at_once_and_offers_out(trained, tmp_path,
                                                                   monkeypatch, capsys):
    before = _names(trained)
    _read_only(trained, monkeypatch)
    try:
        started = time.monotonic()
        assert run_cli(evaluate.main, [str(trained), "--no-report"]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"cannot write in '{trained}' (Permission denied)" in line
        assert "--out DIR" in line and time.monotonic() - started < 5  # before the evaluation
        assert run_cli(evaluate.main, [str(trained), "--no-report", "--out",
                                       str(tmp_path / "results")]) == 0
        assert json.loads((tmp_path / "results" / "metrics.json").read_text())["accuracy"] >= 0
        assert _names(trained) == before
    finally:
        trained.chmod(0o755)


# ----------------------------------------------------------------------------- 6. temp files
def test_6_a_temp_file_left_by_a_kill_is_removed_by_the_resume(tmp_path, monkeypatch, capsys):
    run = _killed_run(tmp_path, "train_state.pt", 2, epochs=2)  # killed writing epoch 2's state
    stale = _temps(run)
    assert stale and "train_state.pt" in _names(run)
    monkeypatch.chdir(tmp_path)
    assert _train(["--resume", "run"]) == 0
    assert not _temps(run) and ".lock" not in _names(run)
    assert torch.load(run / "train_state.pt", weights_only=True)["position"].get("finished")


# ----------------------------------------------------------------------------- 7. file modes
def test_7_every_run_file_has_the_same_mode(trained):
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in trained.iterdir() if p.is_file()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ----------------------------------------------------------------------------- 8. the cache
def test_8_a_damaged_cache_is_regenerated(tmp_path, capsys):
    from protozoo.data.synthetic_parts import GENERATOR

    kwargs = dict(num_classes=2, image_size=24, num_train=6, num_test=2)
    root = GENERATOR.ensure(tmp_path, **kwargs)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    image = sorted((root / "train" / "images").rglob("*.png"))[0]
    original = image.read_bytes()
    image.unlink()  # what the image error message advises for a damaged image
    assert GENERATOR.ensure(tmp_path, **kwargs) == root
    err = capsys.readouterr().err
    assert "is damaged (" in err and "missing" in err
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == files
    assert image.read_bytes() == original
    image.write_bytes(original[:-7] + b"garbage")  # damaged in place, same file count
    GENERATOR.ensure(tmp_path, **kwargs)
    assert f"{image.relative_to(root).as_posix()} changed" in capsys.readouterr().err
    assert image.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary copy left


# ----------------------------------------------------------------------------- 9. two writers
HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_9_a_second_writer_is_refused_and_a_dead_writer_does_not_block(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run" / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _train(FAST + ["--epochs", "1", "--out", "run"]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"run folder 'run' is being written by another training (pid {holder.pid})" \
            in line and "released as soon as that process ends" in line
        assert _names(tmp_path / "run") == [".lock"]
    finally:
        holder.kill()  # kill -9: its lock goes with it
        holder.wait()
    assert _train(FAST + ["--epochs", "1", "--out", "run"]) == 0
    assert ".lock" not in _names(tmp_path / "run")


def test_9_two_trainings_in_one_folder_at_once(tmp_path, monkeypatch, capsys):
    """The second of two runs started on one ``--out`` while the first trains is refused."""
    monkeypatch.chdir(tmp_path)
    real_epoch = protozoo.engine.Trainer._train_epoch
    second = {}

    def epoch(self, *args, **kwargs):  # while the first run trains, a second one starts
        if not second:
            second["rc"] = _train(FAST + ["--epochs", "1", "--out", "run"])
            second["err"] = capsys.readouterr().err
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(protozoo.engine.Trainer, "_train_epoch", epoch)
    assert _train(FAST + ["--epochs", "1", "--out", "run"]) == 0
    assert second["rc"] == 2
    assert "is being written by another training (pid " in _one_error_line(second["err"])
    assert "train_state.pt" in _names(tmp_path / "run")


# ----------------------------------------------------------------------------- memory
def test_evaluation_streams_the_test_split(tmp_path, monkeypatch):
    """evaluate.py reads each test image once: its memory must not grow with the test set's
    pixels (docs/hardening.md measures it at 4,000 and 16,000 images), so the test split is not
    decoded into memory up front; a training run still preloads it."""
    from protozoo.data import build_data
    from protozoo.evaluation import build_eval_data

    cfg = protozoo.config.TrainConfig(model="cam", dataset="synthetic-parts", image_size=24,
                                      num_classes=2, num_train=6, num_test=4,
                                      cache_dir=str(tmp_path))
    model = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=2)
    data = build_eval_data(cfg, model)
    assert data.test._store.images is None and data.push._store.images is not None
    assert len(data.test) == 4 and data.test[3]["image"].shape == (3, 24, 24)
    trained = build_data("synthetic-parts", image_size=24, num_classes=2, num_train=6,
                         num_test=4, cache_dir=tmp_path)
    assert trained.test._store.images is not None
