"""shrinkit's version (one place; the package, the reports and the command line read it)."""

__version__ = "0.1.0"
