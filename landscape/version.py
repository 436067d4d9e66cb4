"""The version of landscape, recorded in the provenance of every store (a floor of its own: imports
nothing)."""

__version__ = "0.1.0"
