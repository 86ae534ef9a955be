"""The ONNX export of the CARAFE modules timed in onnxruntime against eager PyTorch: the command line of
``reproduction.onnx_benchmark`` (whose docstring has the usage)."""

import sys

from reproduction.onnx_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
