"""Decoding, parity verification and engines over a deployment bundle."""
