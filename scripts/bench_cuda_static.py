"""The CUDA kernels' static performance report (registers, occupancy, SASS inner loops, memory traffic), from the
compiled code: the command line of ``reproduction.cuda_static`` (whose docstring says what is measured and how)."""

import sys

from reproduction.cuda_static import main

if __name__ == "__main__":
    sys.exit(main())
