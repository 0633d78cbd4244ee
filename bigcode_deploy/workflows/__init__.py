"""Work that crosses layers: optimize (re-export + passes + parity), verify against a live torch model, build-engine."""
