"""The one exception type for input a user can fix.

Every module raises a subclass of `UserError` for a wrong key, a missing file, a mismatched
tokenizer or checkpoint: its message is one line naming the problem and the fix, and the CLI
prints it without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input with a one-line message that says how to fix it."""
