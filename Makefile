# Every target sets up its own environment in .venv on first use (no GPU needed), so a fresh clone needs only `make`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed
EXTRAS ?= repro,onnx,cuda,dev
# The lock file: exact versions and hashes for every platform, written by `make lock` (uv pip compile; it records no
# index URLs, unlike uv.lock).
LOCK   := requirements.lock
# `make test` runs the suite in this many pytest-xdist processes (each test file or test class stays in one process,
# so a module's fixtures are built once). Most tests are single-threaded, so two keep both cores of a small machine
# busy; TEST_WORKERS=1 runs it in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope
# reproduce-table-*: SCALE=tiny (embedded data) or paper (DATA_ROOT=/path/to/dataset); NPROC processes per run;
# OVERRIDES="key=value ..." Hydra overrides for every row (e.g. model.backbone_weights=... for detection);
# SEEDS=N runs seeds 0..N-1 of every row (default: the table spec's `seeds`); BACKBONES=DIR gives each detection /
# segmentation row the ImageNet weights of its own backbone, DIR/<name>.pt (tasks/classification/backbones.py).
comma := ,
SCALE     ?= tiny
DATA_ROOT ?=
NPROC     ?= 1
OVERRIDES ?=
SEEDS     ?=
BACKBONES ?=

.PHONY: setup lock test test-fast test-compat check-results bench bench-cuda-static op-costs clean reproduce-tables \
	figure-4 figure-5 figure-8 figure-9

setup: $(STAMP)

# The environment is the exact versions in $(LOCK) (every package of the extras in EXTRAS, with their hashes), then
# this checkout installed editable without touching them. uv resolves from the package index only (it never reads
# pip's config), so torch and torchvision arrive as the matched pair pinned there rather than a locally cached CPU-only
# torch that torchvision cannot load. After editing the dependencies in pyproject.toml, run `make lock`.
$(STAMP): pyproject.toml $(LOCK) setup.py carafe/build.py carafe/csrc/reassemble_cpu.cpp
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(UV) pip install --python $(PY) --require-hashes -r $(LOCK)
	$(UV) pip install --python $(PY) --no-deps --config-settings editable_mode=compat -e .
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	@touch $@

lock:
	@test -x $(UV) || { test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PY) -m pip install --quiet uv; }
	$(UV) pip compile pyproject.toml $(foreach extra,$(subst $(comma), ,$(EXTRAS)),--extra $(extra)) --universal \
		--generate-hashes --quiet -o $(LOCK)

test: $(STAMP)
	$(PY) scripts/check_results.py
	$(PYTEST) --durations=25

# Every committed table rendered again from conf/table/ and the run records in results/runs/, compared byte for byte;
# fails on a hand-edited or stale table, a run without a record, or a SUMMARY.md that the tables do not render.
check-results: $(STAMP)
	$(PY) scripts/check_results.py

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The operator tests in a fresh environment with the oldest torch that pyproject.toml allows (TORCH_FLOOR), from the
# package index, and this checkout with the dependencies it declares, resolved anew (docs/packaging.md). .ci/run runs it after `make test`. The first
# run downloads that torch with its CUDA libraries (a few GB); uv's cache keeps them for the next.
TORCH_FLOOR  ?= 2.9.1
COMPAT       := .venv-compat
COMPAT_TESTS := tests/test_ops.py tests/test_modules.py tests/test_op_faults.py tests/test_wheel.py
test-compat: $(STAMP)
	rm -rf $(COMPAT)
	$(UV) venv --quiet --python $(PY) $(COMPAT)
	$(UV) pip install --python $(COMPAT)/bin/python --config-settings editable_mode=compat -e ".[onnx,dev]" \
		"torch==$(TORCH_FLOOR)" uv
	$(COMPAT)/bin/python -c "import torch; print('torch', torch.__version__)"
	$(COMPAT)/bin/python -m pytest -p no:cacheprovider $(COMPAT_TESTS)

bench: $(STAMP)
	$(PY) scripts/bench_op.py --device cpu

# The CUDA kernels' static report (registers, occupancy, SASS instructions per FMA, memory-traffic model) from the
# compiled code; needs nvcc and cuobjdump, no GPU. The "before" columns come from the JSON of an earlier commit.
bench-cuda-static: $(STAMP)
	$(PY) scripts/bench_cuda_static.py --before results/bench/cuda-static-before.json

op-costs: $(STAMP)
	$(PY) scripts/op_costs.py --write results/op-costs.md

# make reproduce-table-pp-12, reproduce-table-pp-2, ...: the tables declared in conf/table/; `make list-tables` prints
# each one's title, rows and the runs it shares with other tables.
reproduce-table-%: $(STAMP)
	$(PY) scripts/reproduce.py $* --scale $(SCALE) --nproc $(NPROC) $(if $(SEEDS),--seeds $(SEEDS)) \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(BACKBONES),--backbones $(BACKBONES)) $(OVERRIDES)

# ICCV 2019 Figure 8 from Table 5's seed-0 UperNet runs, with and without CARAFE (run reproduce-table-5 first).
figure-8: $(STAMP)
	$(PY) scripts/segmentation_figure.py --table 5 --out results/figures/figure-8.png $(if $(filter tiny,$(SCALE)),--zoom 3)
# ICCV 2019 Figure 9 from Table 7's seed-0 Global&Local runs, with and without CARAFE (run reproduce-table-7 first).
figure-9: $(STAMP)
	$(PY) scripts/inpainting_figure.py --table 7 --out results/figures/figure-9.png $(if $(filter tiny,$(SCALE)),--zoom 3)
# ICCV 2019 Figure 5: where CARAFE in the FPN reassembles P2 units from, in Table 1's seed-0 Mask R-CNN w/ CARAFE
# run (run reproduce-table-1 first); Figure 4 / CARAFE++ Figure 6: Table 1's seed-0 Mask R-CNN without and with
# CARAFE, detections side by side. At tiny scale the detectors are barely trained, so figure-4 lowers the threshold.
figure-5: $(STAMP)
	$(PY) scripts/figure5.py --table 1 --out results/figures/figure-5.png
figure-4: $(STAMP)
	$(PY) scripts/detection_figure.py --table 1 --out results/figures/figure-4.png \
		$(if $(filter tiny,$(SCALE)),--threshold 0.3 --max-per-image 8)
list-tables: $(STAMP)
	@$(PY) scripts/reproduce.py --list --scale $(SCALE)

clean:
	rm -rf $(VENV) $(COMPAT) build .pytest_cache carafe/_native
