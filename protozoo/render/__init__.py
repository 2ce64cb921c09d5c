"""Rendering: overlays, panels and HTML reports. Pure functions: arrays in, files out."""
from .overlay import draw_box, heatmap_overlay  # noqa: F401
from .evidence import evidence_report  # noqa: F401
