"""The one exception type a recipe raises for bad input: it carries a message that names the setting and the fix."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe cannot run as configured (unknown name, missing file, unreachable judge, unfit launcher, …).

    ``orthoreg.train`` prints the message without a traceback and exits with status 2, before any training starts.
    """
