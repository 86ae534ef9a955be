"""Benchmark the CARAFE / CARAFE++ reassembly paths against each other and the operators used instead: the command
line of ``reproduction.op_benchmark`` (whose docstring says what is timed and how)."""

from reproduction.op_benchmark import main

if __name__ == "__main__":
    main()
