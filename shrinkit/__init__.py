"""shrinkit: cut a smaller, ready-to-train student out of a pretrained transformer checkpoint."""

__version__ = "0.1.0"
