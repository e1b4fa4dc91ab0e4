"""``python -m madfunc``: the command line (see ``madfunc --help``)."""

from madfunc.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
