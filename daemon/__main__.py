from daemon.cli import main

if __name__ == "__main__":  # reader processes import this module again (multiprocessing spawn)
    raise SystemExit(main())
