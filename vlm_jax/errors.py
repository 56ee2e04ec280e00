"""User-facing errors: one exception type and the CLI wrapper that turns it into one clear line.

Anything a user can cause (bad config, missing data, a checkpoint of another model, an unreadable
image) raises `UserError` with a message that names the cause and the fix. The CLI entry points
run under `run_cli`, which prints `error: <message>` and exits non-zero; `--debug` (or
VLM_JAX_DEBUG=1) re-raises so the full traceback is shown.
"""

import os
import sys


class UserError(Exception):
  """An error caused by the user's input; its message says what is wrong and how to fix it."""


def exception_chain(e: BaseException, implicit: bool = True, limit: int = None) -> list:
  """`e` and the exceptions it was raised from (`raise ... from`), with `implicit` also those it was
  raised while handling; outermost first, each once, at most `limit` of them."""
  chain = [e]
  while limit is None or len(chain) < limit:
    nxt = chain[-1].__cause__ or (chain[-1].__context__ if implicit else None)
    if nxt is None or any(nxt is x for x in chain):
      break
    chain.append(nxt)
  return chain


def debug_enabled(argv=None) -> bool:
  argv = sys.argv if argv is None else argv
  return "--debug" in argv or os.environ.get("VLM_JAX_DEBUG", "") not in ("", "0")


def run_cli(main, argv=None) -> int:
  """Runs `main()`; converts a UserError into `error: ...` on stderr and exit status 2."""
  try:
    main()
  except UserError as e:
    if debug_enabled(argv):
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0
