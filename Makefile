# The two commands of the README: `make test` and `make report`. Both create .venv/ on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PARAMS ?= params/default.yaml

VERIFY_OUT ?= results/verify/$(basename $(notdir $(PARAMS)))

.PHONY: venv system-deps test report verify lab bench sync notebooks clean-results

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (proxygap)" >/dev/null
	@touch $(STAMP)

venv: $(STAMP)

# System programs the tests need: installed when root on Debian/Ubuntu, else one line says what to install.
system-deps:
	@bash scripts/system_deps.sh chromium slurm

test: system-deps $(STAMP)
	PROXYGAP_THREADS=1 $(PY) -m pytest tests notebooks --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg

report: $(STAMP)
	$(PY) -m proxygap_helpers run $(PARAMS)

# Run the study into results/verify/<grid> (not over the published report) and compare every table with
# reports/<grid>/, cell by cell. PROXYGAP_THREADS=2 make verify does it at another thread count.
verify: $(STAMP)
	$(PY) -m proxygap_helpers run $(PARAMS) --out $(VERIFY_OUT)
	$(PY) -m proxygap_helpers verify $(PARAMS) --out $(VERIFY_OUT)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) -m pip install -q -c requirements.lock -e ".[dev,bench]"  # the peer trainer (EleutherAI sparsify)
	$(PY) benchmarks/run.py

sync: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/*.py

# Re-execute the six notebooks in place on their defaults (the smoke grid, from scratch), so that the outputs
# nbval compares are the current code's: run after a change that moves the smoke numbers, then commit them.
notebooks: $(STAMP)
	rm -rf results/smoke
	cd notebooks && for nb in 01_extract 02_train 03_evaluate 04_aggregate 05_report 06_ladder; do \
	  PROXYGAP_THREADS=1 TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 ../$(VENV)/bin/jupyter nbconvert \
	    --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=1800 --ExecutePreprocessor.kernel_name=python3 $$nb.ipynb || exit 1; done

clean-results:
	rm -rf results/
