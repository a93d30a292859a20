"""The one exception type the library raises for bad input.

The CLI turns a `GistError` into one red line and exit code 2; a Python caller gets the
same message. Each message names the bad value and says how to fix it.
"""


class GistError(Exception):
    """Bad input or an incompatible file: the message is meant for the user, one line."""
