"""ICCV 2019 Figure 9 (inpainting results): the command line of ``reproduction.figure_inpainting`` (whose docstring is
this command's ``--help``)."""

from reproduction.figure_inpainting import main

if __name__ == "__main__":
    main()
