"""The distribution's version (pyproject reads it from here; manifests and the C ABI report it)."""

__version__ = "0.1.0"
