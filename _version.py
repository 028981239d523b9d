"""The package version, in a module of its own so that the file header can record it without importing the root."""

__version__ = "0.1.0"
