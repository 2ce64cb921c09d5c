"""Model families, one per file; importing this package registers them all."""
from . import cam, protopnet  # noqa: F401
from .base import LogitsView, ZooModel

__all__ = ["ZooModel", "LogitsView"]
