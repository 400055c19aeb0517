"""Imports every reader module so that each registers itself."""

from builder.corpus import builtin, folder  # noqa: F401
