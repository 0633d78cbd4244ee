"""The reference GPTBigCode model, its checkpoint loader and the ONNX export."""

__version__ = "0.1.0"  # the distribution's version (pyproject reads it from here)
