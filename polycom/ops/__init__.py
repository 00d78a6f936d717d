"""Implementations of the PolyCom ops. ``reference`` is the specification; fast paths live beside it."""

from polycom.ops import reference

__all__ = ["reference"]
