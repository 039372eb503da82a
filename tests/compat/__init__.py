"""Tests of packrunner.compat (the PopRT drop-in API)."""
