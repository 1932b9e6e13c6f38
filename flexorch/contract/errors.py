"""The one exception type for bad input (job, prompts, model files).

The CLI prints its message as one line on stderr and exits with status 2; anything else is an
internal failure (exit 1, traceback kept in the log).
"""


class UserError(Exception):
    """Bad input, named in the message (file, key, line or layer at fault)."""
