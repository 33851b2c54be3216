"""The package version (recorded in prepared folders and checkpoints)."""
__version__ = "0.1.0"
