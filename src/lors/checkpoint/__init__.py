"""Checkpoint readers and converters."""
