"""The reference GPTBigCode model, its checkpoint loader and the ONNX export."""
