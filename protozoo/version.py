"""The package version, in a leaf module so that checkpoints can record it without importing the
package's ``__init__`` (which imports everything)."""

__version__ = "0.1.0"
