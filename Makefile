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

.PHONY: run test test-avx2 env data bench paper paper-smoke readme clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

data:
	sh scripts/get-fashion-mnist.sh

# The main job: rounding error propagated through the Fashion-MNIST ResNet50 baseline
# (trained into the user cache first if it is not there; the study says how long that takes).
# --force lets it replace its own previous run in runs/drift, never anything else.
run: $(STAMP) data
	$(BIN)/python -m studies.drift --force

test: $(STAMP) data
	$(BIN)/python -m pytest -n $(JOBS) --dist loadgroup tests

# The tests whose outcome depends on the CPU's INT8 kernel (FBGEMM saturates int16 pair sums
# with AVX2, not with AVX512-VNNI), run on an emulated AVX2-only CPU (QEMU's Haswell model,
# Debian's qemu-user, installed here when run as root, less the features its emulator lacks):
# on an AVX512 machine this runs the tests that `make test` skips there (4 minutes on an Intel
# Xeon of this kind, emulated: 61 passed, the 9 that need the VNNI kernel skipped). The
# drift study's smoke run did not finish in 45 minutes so; its INT8 cross-check runs on a
# small network instead.
AVX2_CPU := Haswell,-pcid,-tsc-deadline,-x2apic,-hle,-invpcid,-rtm
KERNEL_TESTS := tests/qerror/nn/test_int8.py \
	tests/studies/test_drift.py::test_int8_crosscheck_names_the_pipeline_the_kernel_follows
test-avx2: $(STAMP) data
	command -v qemu-x86_64 >/dev/null || { test "$$(id -u)" = 0 && { apt-get install -y -qq \
	    qemu-user >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-user \
	    >/dev/null; }; }; } || { echo "needs qemu-x86_64 (Debian: qemu-user)"; exit 1; }
	OMP_NUM_THREADS=1 qemu-x86_64 -cpu $(AVX2_CPU) $(BIN)/python -c "from qerror.nn.int8 \
	    import kernel_probe as k; p = k(); print(p.describe()); raise SystemExit(None if \
	    p.saturates_pairs else 'the emulated CPU did not run the saturating AVX2 kernel')"
	OMP_NUM_THREADS=1 qemu-x86_64 -cpu $(AVX2_CPU) $(BIN)/python -m pytest -p no:xdist -rs \
	    $(KERNEL_TESTS)

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
