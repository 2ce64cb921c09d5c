"""Model families, one per file; importing this package registers them all."""
from . import cam, hard_attention, protopnet, vqa  # noqa: F401
from . import niwt  # noqa: F401  (NIWT zero-shot head)
from .base import LogitsView, ZooModel

__all__ = ["ZooModel", "LogitsView"]
