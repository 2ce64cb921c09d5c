"""Command-line glue for ``train.py``: run folders named on the command line, and the model a run
trains.

The application layer (DESIGN.md, "Layering"): it may import every module below it. What a
family needs is asked of the family (:class:`protozoo.models.ZooModel`): ``from_config`` builds
the model, and a family with a ``base_run`` extends a trained run (``--base RUN``), whose files
are read here and whose settings the family picks (``inherited_config``).
"""
from __future__ import annotations

from pathlib import Path

from . import checkpoint
from .config import RUN_CONFIG, TrainConfig, read_config_json
from .errors import UserError
from .models.base import ZooModel
from .registry import MODELS, list_models


def extends_runs(name: str) -> bool:
    """Does model family ``name`` extend a trained run (``train.py --base RUN``)?"""
    return getattr(MODELS.get(name), "base_run", None) is not None


def check_base_dir(base_dir, name: str) -> Path:
    """The ``--base`` folder of family ``name``, checked to hold a trained model."""
    if not base_dir:
        raise UserError(f"model '{name}' extends a trained run: pass --base RUN_DIR, "
                        f"{MODELS.get(name).base_run}")
    path = Path(base_dir)
    if not (path / checkpoint.CONFIG).is_file():
        raise UserError(f"--base '{base_dir}' is not a trained run (no {checkpoint.CONFIG}): "
                        "pass the --out folder of a finished train.py run")
    return path


def base_settings(base_dir, name: str) -> dict:
    """The settings run ``base_dir`` passes on to a run of family ``name`` (flags given on the
    command line override them); a one-line error when ``name`` extends no run."""
    if not extends_runs(name):
        users = [n for n in list_models() if extends_runs(n)]
        raise UserError(f"--base RUN_DIR is for --model {' or '.join(users)} (a head on a "
                        f"trained run), not --model {name}")
    path = check_base_dir(base_dir, name)
    run_config = read_config_json(path / RUN_CONFIG) if (path / RUN_CONFIG).is_file() else {}
    return MODELS.get(name).inherited_config(run_config, checkpoint.read_config(path))


def build_model(cfg: TrainConfig, data):
    """The model run ``cfg`` trains on ``data``: the family's ``from_config``, given the model of
    the ``--base`` run (``cfg.model_args["base"]``) when the family extends one."""
    build = getattr(MODELS.get(cfg.model), "from_config", ZooModel.from_config)
    base = None
    if extends_runs(cfg.model):
        base = checkpoint.load(check_base_dir(cfg.model_args.get("base"), cfg.model))
    return build(cfg, data, base)
