# Two commands on a fresh machine: `make demo` (the main job: ST-ResNet's Table 3 in miniature
# on the built-in synthetic action set, CPU only) and `make test`. Both create .venv and
# install everything they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SAMPLES ?= ../shared/data/videos
DEMO_OUT ?= out/synthetic_mini
SAMPLES_OUT ?= out/sample-frames

.PHONY: install demo samples test lint clean

# torch is installed first, pinned, so pip takes the local CPU build instead of a multi-GB CUDA one.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pipelines run synthetic_mini --out $(DEMO_OUT)

# RGB frames of the sample clips in ../shared/data/videos (the demo before the pipelines existed).
samples: $(STAMP)
	$(BIN)/flowprep extract $(SAMPLES) -o $(SAMPLES_OUT)

# pytest exits 5 when it collected no tests: that must fail, not pass silently.
test: $(STAMP)
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf $(VENV) out *.egg-info
