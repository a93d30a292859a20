"""The package version, in a module of its own: library modules record it without importing the package."""

__version__ = "0.1.0"
