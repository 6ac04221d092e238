"""Metrics as pure functions of tensors or feature arrays."""
