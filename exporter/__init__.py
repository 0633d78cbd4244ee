"""The reference GPTBigCode model, its checkpoint loader and saver, the ONNX export and the torch reference backend.

Sits on bigcode_deploy.runtime; imports nothing from graphs/ or the workflows above it.
"""
