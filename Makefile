# lineside: two commands on a fresh machine.
#   make demo   create .venv, install, train the quickstart EL grading model on the built-in
#               ELPV cells, evaluate it on the held-out module blocks and score them to CSV
#   make test   same install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LS     := $(VENV)/bin/lineside
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-all bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,backbones,tensorrt,line,plant,adapt]'
	touch $@

install: $(VENV)/.installed

# The demo's run folder is runs/quickstart (the config's trainer.default_root_dir). A fit never
# replaces another run's checkpoints unless told: the demo passes --overwrite, and drops the
# previous scores (score resumes an existing output), so `make demo` can be run again.
demo: install
	$(LS) fit --config configs/quickstart.yaml --overwrite
	$(LS) test --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/best.ckpt
	$(LS) elpv manifest --split test --out runs/quickstart/elpv_test.csv
	rm -rf runs/quickstart/scores.csv runs/quickstart/overlays
	$(LS) score --ckpt runs/quickstart/checkpoints/best.ckpt --input runs/quickstart/elpv_test.csv \
		--output runs/quickstart/scores.csv --overlays runs/quickstart/overlays

test: install
	$(PY) -m pytest -p no:dash -q -m "not slow"

test-all: install
	$(PY) -m pytest -p no:dash -q

bench: install
	$(PY) bench/score_throughput.py

clean:
	rm -rf runs .pytest_cache
