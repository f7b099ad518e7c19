"""The one exception type the entry points print without a traceback. Kept free of heavy imports, so that the
`docvlm` command can answer `--help` and usage errors in well under a second."""


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing column, unreachable Hub...). Printed without a traceback."""
