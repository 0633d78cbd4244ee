"""ONNX graph passes that lower an exported bundle for one target."""
