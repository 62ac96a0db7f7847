"""Thin absl binaries: flag parsing and wiring around `mbjax` library functions."""
