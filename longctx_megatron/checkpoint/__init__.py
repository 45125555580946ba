"""Sharded, layout-independent checkpoints: every rank writes its own slices of global tensors."""
