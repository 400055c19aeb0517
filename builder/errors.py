"""Domain errors. Each is a ValueError whose message names the item at fault and the fix."""


class BuilderError(ValueError):
    """Base of all user-facing errors; the CLI prints the message on one line and exits 1."""


class RecipeError(BuilderError):
    """A recipe key, value or file is wrong."""


class CorpusError(BuilderError):
    """The corpus cannot be read, or yields no usable sample."""


class ModelError(BuilderError):
    """The model cannot be loaded or has no hookable decoder MLPs."""


class StageError(BuilderError):
    """A stage cannot run (missing upstream output, inconsistent state)."""
