# The two commands a fresh machine needs: `make test` (and, with the training issue, `make demo`).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo install clean fmt tensorboard notebook notebooks-run

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the package metadata changes. The test extra needs PyTorch (the outside
# reference of the Hugging Face tests); these machines hold a CPU build of torch 2.13.0 locally,
# so that version goes first (any torch >= 2.2 works: `make install TORCH=torch`).
TORCH ?= torch==2.13.0
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Two workers, one test file each at a time (a file's fixtures are built once): the suite is
# mostly single-threaded XLA compilation, so the 2 cores of the CI machine halve its time.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Build the embedded corpus, train configs/demo.py on CPU, evaluate and print a summary.
# Run it again to resume (or to just print the summary of a finished run).
DEMO_DIR ?= runs/demo
demo: $(STAMP)
	$(PY) -m experiments.train --config=configs/demo.py --workdir=$(DEMO_DIR)

# TensorBoard on a run (or a sweep) directory: installs the optional extra once, then serves.
RUN ?= $(DEMO_DIR)
tensorboard: $(STAMP)
	( $(PY) -c "import tensorboard" && $(PY) -m pip show -q xprof ) >/dev/null 2>&1 || \
		$(PY) -m pip install --quiet -e '.[tensorboard]'
	$(VENV)/bin/tensorboard --logdir $(RUN) --bind_all

# JupyterLab on notebooks/: jupytext opens the py:percent files as notebooks and saves back to
# them, so nothing new appears in the tree (checkpoints go under .venv, not beside the files).
notebook: $(STAMP)
	$(PY) -c "import jupyterlab, jupytext" 2>/dev/null || $(PY) -m pip install --quiet -e '.[notebook]'
	JUPYTER_CONFIG_DIR=$(abspath $(VENV))/etc/jupyter $(VENV)/bin/jupyter lab notebooks \
	    --FileContentsManager.checkpoints_kwargs="root_dir='$(abspath $(VENV))/notebook-checkpoints'" \
	    $(if $(filter 0,$(shell id -u)),--allow-root) $(JUPYTER_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# Code style: ruff's formatter, 100 columns (not a test dependency; installed on demand).
fmt: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff format --line-length 100 switchmoe tests configs experiments

# Every notebook executed headless, saved with its figures under runs/notebooks/ (the notebook
# extra installed first; settings from SWITCHMOE_* variables, see each notebook's first cell).
notebooks-run: $(STAMP)
	$(PY) -c "import jupytext, nbclient, ipykernel" 2>/dev/null || $(PY) -m pip install --quiet -e '.[notebook]'
	$(PY) -m experiments.run_notebooks
