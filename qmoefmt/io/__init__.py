"""Checkpoints in (safetensors, .pt/.bin, HDF5), safetensors out."""
