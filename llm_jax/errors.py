"""How the program ends on the user's account: input they can fix, or their Ctrl-C.

Every module raises a subclass of `UserError` for a wrong key, a missing file, a mismatched
tokenizer or checkpoint: its message is one line naming the problem and the fix, and the CLI
prints it without a traceback. Anything else is a bug and keeps its traceback.
"""

import os
import sys
from typing import NoReturn


class UserError(Exception):
  """Bad input with a one-line message that says how to fix it."""


def exit_interrupted() -> NoReturn:
  """Ends the process at once with one line and status 130 (killed by SIGINT), as a second Ctrl-C asks.

  `os._exit`, not an exception: a KeyboardInterrupt raised while Python runs a garbage-collection
  callback or a finalizer is printed and dropped, and background save threads would print their
  own tracebacks at shutdown. Checkpoints are written to a temporary folder and renamed when
  complete, so one cut short is never mistaken for a checkpoint.
  """
  print("llm-jax: interrupted; checkpoints that were complete are intact (an unfinished save is removed when "
        "the run resumes)", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(130)
