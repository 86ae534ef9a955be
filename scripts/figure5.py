"""ICCV 2019 Figure 5 (the units CARAFE reassembles in the FPN): the command line of ``reproduction.figure_reassembly``
(whose docstring is this command's ``--help``)."""

from reproduction.figure_reassembly import main

if __name__ == "__main__":
    main()
