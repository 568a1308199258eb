"""``python -m daemon`` and the ``registry-pruned`` script."""


def run() -> int:
    """Run the CLI."""
    # imported here, not at the top: spawned reader processes import the script that started
    # the daemon again, and the CLI's imports would cost each of them ~10 MB and 0.2 s
    from daemon.cli import main

    return main()


if __name__ == "__main__":
    raise SystemExit(run())
