"""daemon.memory: glibc's malloc is asked for one arena, unless the environment decides."""

from __future__ import annotations

import subprocess
import sys

import pytest

from daemon.memory import one_malloc_arena


def test_one_malloc_arena_set_here_and_left_to_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert one_malloc_arena() is True  # glibc (CI and the image are Debian)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert one_malloc_arena() is False


def test_the_cli_sets_it_before_any_thread() -> None:
    # the entry point calls it before importing the CLI (whose drivers start threads)
    code = (
        "import threading, daemon.memory as m; calls = [];"
        "m.one_malloc_arena = lambda: calls.append(threading.active_count());"
        "import daemon.__main__ as d, sys; sys.argv = ['prog', '--help'];"
        "\ntry: d.run()\nexcept SystemExit: pass\nprint(calls)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[1]"
