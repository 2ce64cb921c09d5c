"""Model families, one per file; importing this package registers them all.

:func:`create_model` and :func:`list_models` (re-exported from :mod:`protozoo.registry`) see
every family once this package is imported, which ``import protozoo`` does first.
"""
from ..registry import create_model, list_models, register_model  # noqa: F401
from . import cam, hard_attention, protopnet, vqa  # noqa: F401
from . import niwt  # noqa: F401  (NIWT zero-shot head)
from .base import LogitsView, ZooModel

__all__ = ["ZooModel", "LogitsView", "create_model", "list_models", "register_model"]
