"""Checkpoints, optimizer, noise injection, numerical-stability glue, run logging and the report
written from the logs."""
