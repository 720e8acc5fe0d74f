"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class StillhouseError(Exception):
    """Bad input from the user (recipe, model spec, task, data). Message names the culprit."""


class EmptyDatasetError(StillhouseError):
    """A stage produced no records (for example nothing passed verification)."""
