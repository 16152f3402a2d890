"""Runnable examples of repeat-every. Not installed with the package: run them from a clone."""
