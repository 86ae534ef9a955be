"""ICCV 2019 Figure 4 / CARAFE++ Figure 6 (each run's detections): the command line of
``reproduction.figure_detections`` (whose docstring is this command's ``--help``)."""

from reproduction.figure_detections import main

if __name__ == "__main__":
    main()
