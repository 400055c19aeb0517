"""Imports every reader module so that each registers itself."""

from builder.corpus import builtin, folder, hf, llava_json  # noqa: F401
