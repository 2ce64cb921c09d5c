"""``python -m protozoo train ...`` / ``python -m protozoo evaluate ...`` (see protozoo.cli)."""
import sys

from protozoo.cli import protozoo_command

sys.exit(protozoo_command())
