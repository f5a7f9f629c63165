"""distillery: distil a registered teacher classifier into a small student, and ship it only when it earns it."""

__version__ = "0.1.0"
