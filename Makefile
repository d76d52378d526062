# Two entry points (see README): `make run` runs the main job, `make test` the whole test suite.
# Both create or reuse .venv and install the package into it with pip.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch and torchvision are pinned to the builds that lie on this kind of machine's disk;
# any torch>=2.3 works with the code.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.qerror-installed
PEERS  := $(VENV)/.qerror-peers
JOBS   ?= 2

.PHONY: run test test-avx2 lint env data bench paper paper-smoke readme clean

env: $(STAMP)

# A .venv whose python has no pip is made again: what `python3 -m venv` leaves behind on
# Debian/Ubuntu without python3-venv (it prints the apt command) or when cut short.
$(STAMP): pyproject.toml Makefile
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

data:
	QERROR_PYTHON=$(BIN)/python sh scripts/get-fashion-mnist.sh

# The main job: rounding error propagated through the Fashion-MNIST ResNet50 baseline
# (trained into the user cache first if it is not there; the study says how long that takes).
# --force lets it replace its own previous run in runs/drift, never anything else.
run: $(STAMP) data
	$(BIN)/python -m studies.drift --force

test: $(STAMP) data
	$(BIN)/python -m pytest -n $(JOBS) --dist loadgroup tests
	$(MAKE) --no-print-directory test-avx2

# pyflakes and import order (pyproject.toml's [tool.ruff]); .ci/run runs it first.
lint: $(STAMP)
	$(BIN)/ruff check qerror studies tests paper

# The tests whose outcome depends on the CPU's INT8 kernel (FBGEMM and oneDNN saturate int16
# pair sums with AVX2, not with AVX512-VNNI), run on AVX2's kernels whatever the CPU: both
# libraries pick their instructions at run time, and FBGEMM_ENABLE_INSTRUCTIONS and
# ONEDNN_MAX_CPU_ISA hold them to AVX2 (the real AVX2 kernels on this CPU's hardware; ATen's
# own kernels held too). On an AVX512-VNNI machine this runs the tests `make test`'s first
# pass skips there (15 s); the kernel probe must find the saturating kernel in both
# libraries first. `make test` runs it after the suite.
AVX2_KERNELS := FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
KERNEL_TESTS := tests/qerror/nn/test_int8.py \
	tests/studies/test_drift.py::test_int8_crosscheck_names_the_pipeline_the_kernel_follows
test-avx2: $(STAMP) data
	$(AVX2_KERNELS) OMP_NUM_THREADS=1 $(BIN)/python -c "from qerror.nn.int8 import \
	    kernel_probe as k; p = [k(e) for e in ('fbgemm', 'x86')]; print(p[0].describe()); \
	    raise SystemExit(None if all(q.faithful and q.saturates_pairs for q in p) else 'the AVX2 kernels \
	    were not held: ' + ' / '.join(q.describe() for q in p))"
	$(AVX2_KERNELS) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -p no:xdist -rs -q $(KERNEL_TESTS)

# The bench's peers (the optional extra `peers`): wisardpkg 1.6.3's setup imports pybind11
# without declaring it, so it builds only without build isolation, pybind11 installed first.
$(PEERS): $(STAMP)
	$(BIN)/python -m pip install --quiet pybind11 setuptools wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation -e '.[peers]'
	touch $@

bench: $(PEERS)
	$(BIN)/python -m studies.bench --force

# The paper (paper/main.pdf) from the studies' outputs in runs/<study>; a missing one is named
# with the command that makes it. paper-smoke runs every study with --smoke first (a few minutes).
paper: $(STAMP)
	$(BIN)/python paper/build.py

paper-smoke: $(STAMP) data
	$(BIN)/python paper/build.py --smoke

# The README's measured passages, rendered from the runs recorded in paper/record (copies of
# their manifests and outputs, checked by sha256); the test suite fails when one is stale.
readme: $(STAMP)
	$(BIN)/python paper/readme.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
