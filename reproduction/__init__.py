"""The reproduction of the papers' tables, between the entry points in ``scripts/`` and the tasks in ``tasks/``.

One module per job, each importing only those before it:

- ``spec``: the table-spec format (``conf/table/<name>.yaml``) and composing each row and seed into a config;
- ``records``: one record per finished run, ``results/runs/<config hash>.json``, the only home of a run's values;
- ``runs``: finding finished runs (records, run folders, sweeps) and how each run's code relates to a commit;
- ``stats``: the Student t distribution and Welch's comparison of two rows' seeds;
- ``seeds``: a column over a row's seeds, and each row against its baseline;
- ``measure``: the values measured when a table is rendered (operator costs, inference speed);
- ``render``: a table's markdown and JSON, and ``results/SUMMARY.md``;
- ``figures``: a table's figure;
- ``check``: rendering a committed table again from its spec and the records (``make check-results``);
- ``recover``: records from tables rendered before records existed;
- ``reproduce``: the loop that trains what is missing and writes the table;
- ``figure_detections``, ``figure_reassembly``, ``figure_segmentation``, ``figure_inpainting``: the papers'
  qualitative figures (ICCV 2019 Figures 4, 5, 8 and 9) drawn from a table's finished runs;
- ``op_benchmark``: the operators' speed and memory on this machine (``results/bench/op-<device>.md``);
- ``op_costs``: every operator's FLOPs and parameters, with the papers' figures (``results/op-costs.md``);
- ``onnx_benchmark``: the exported modules in onnxruntime against eager PyTorch (``results/bench/onnx-cpu.md``);
- ``cuda_static``: the CUDA kernels' static performance report (``results/bench/cuda-static.md``).

``scripts/reproduce.py``, ``scripts/check_results.py``, ``scripts/recover_records.py``, ``scripts/detection_figure.py``,
``scripts/figure5.py``, ``scripts/segmentation_figure.py``, ``scripts/inpainting_figure.py``, ``scripts/bench_op.py``,
``scripts/op_costs.py``, ``scripts/bench_onnx.py`` and ``scripts/bench_cuda_static.py`` are their command lines.
"""
