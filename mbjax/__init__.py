"""mbjax: a JAX-native, functional implementation of the MetaBonk training system."""

__version__ = "0.1.0"
