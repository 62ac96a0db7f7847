"""Environments: the functional env interface, wrappers, adapters and the embedded games."""
