"""The base layer that services and CI machines embed: the bundle contract, backends, decoding, parity, the C ABI.

Imports nothing from exporter/, graphs/ or the workflows above it, and never torch.
"""
