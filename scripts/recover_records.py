"""Recover run records (results/runs/) from tables rendered before records existed.

The command line of ``reproduction.recover`` (its docstring is this command's ``--help``)."""

import sys

from reproduction.recover import main

if __name__ == "__main__":
    sys.exit(main())
