"""Error types. Each carries the process exit code the CLI returns for it.

2: the command line or the recipe is wrong; 3: the parent checkpoint is bad or unsupported;
1: anything else (I/O failure, internal error); 130: interrupted (SIGINT); 143: terminated (SIGTERM).
The CLI also exits 4 when the child was written but its verification failed or missed the
recipe's gate (the child is kept; not an exception).
"""


class ShrinkitError(Exception):
    """An error with a one-line message that says what is wrong and how to fix it."""

    exit_code = 1


class UsageError(ShrinkitError):
    exit_code = 2


class RecipeError(ShrinkitError):
    exit_code = 2


class ParentError(ShrinkitError):
    exit_code = 3


class OutputError(ShrinkitError):
    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run cleans up as it does for SIGINT."""
