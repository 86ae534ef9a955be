"""Reproduce one table of the papers: train the rows and seeds without a record, then render results/.

The command line of ``reproduction.reproduce`` (its docstring is this command's ``--help``)."""

import sys

from reproduction.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
