"""Checks over a packaged dataset folder: schemas, value ranges, invariants, card and files.

`validate_dataset(path)` returns a :class:`Report`; `build-neuron-dataset validate DIR`
prints it and exits non-zero when any check failed. `publish` refuses a failing folder.
"""

from validation.checks import Check, Report, resolve_dataset_dir, validate_dataset

__all__ = ["Check", "Report", "resolve_dataset_dir", "validate_dataset"]
