"""FLOPs and parameters of every operator and of the CARAFE ablation grids, with the papers' figures beside ours:
the command line of ``reproduction.op_costs`` (whose docstring has the usage)."""

import sys

from reproduction.op_costs import main

if __name__ == "__main__":
    sys.exit(main())
