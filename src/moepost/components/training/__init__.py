"""Checkpoints, optimizer, noise injection, numerical-stability glue, run logging."""
