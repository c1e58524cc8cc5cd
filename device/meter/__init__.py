"""Utility meter reading on the device: digit-wheel model, alignment, assembly, post-processing, outputs."""
