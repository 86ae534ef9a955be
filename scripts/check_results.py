"""make check-results: render every committed table again from its spec and the run records; fail on any difference.

The command line of ``reproduction.check`` (its docstring is this command's ``--help``)."""

import sys

from reproduction.check import main

if __name__ == "__main__":
    sys.exit(main())
