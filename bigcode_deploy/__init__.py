"""bigcode-deploy: GPTBigCode (SantaCoder/StarCoder) from PyTorch to ONNX and TensorRT, run with verified parity.

Layers, importing downward only (checked by import-linter in CI, see pyproject.toml):
    bigcode_deploy.cli                      the command line
    bigcode_deploy.workflows                work that crosses layers (optimize, live-torch verify, build-engine)
    bigcode_deploy.exporter | .graphs       the torch reference and export | the graph passes (independent)
    bigcode_deploy.runtime                  the bundle contract, backends, decoding, parity, C ABI (no torch)
The repository keeps runtime/, exporter/ and graphs/ as top-level folders; pyproject maps them into this namespace.
"""
