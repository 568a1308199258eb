"""``python -m daemon`` and the ``registry-pruned`` script."""

import os
import signal
import sys


def run() -> int:
    """Run the CLI."""
    # imported here, not at the top: spawned reader processes import the script that started
    # the daemon again, and the CLI's imports would cost each of them ~10 MB and 0.2 s.
    # daemon.logs first: it imports structlog without rich, for every module after it
    from daemon import logs  # noqa: F401
    from daemon.cli import main
    from daemon.memory import one_malloc_arena

    one_malloc_arena()  # before any thread: each would get an arena of its own (issue 19)
    try:
        status = main()
        sys.stdout.flush()  # a pipe's buffer is written here, inside the try, not at exit
        return status
    except BrokenPipeError:
        # `registry-pruned check | head -2`: the reader has what it wanted. Point stdout at
        # /dev/null so the interpreter's last flush does not raise again, and exit quietly
        # with the status a shell gives a process that SIGPIPE ended
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    raise SystemExit(run())
