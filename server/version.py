"""The package's version, in one place: pyproject.toml reads it, /info and /openapi.json report it."""
__version__ = "0.2.0"
