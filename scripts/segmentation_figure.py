"""ICCV 2019 Figure 8 (segmentation results): the command line of ``reproduction.figure_segmentation`` (whose docstring
is this command's ``--help``)."""

from reproduction.figure_segmentation import main

if __name__ == "__main__":
    main()
