# make demo: fine-tune the embedded tiny GPT-2 on the bundled text and show the loss drop.
# make test: the whole test suite (about 10 minutes on 2 cores).
# Both create .venv when it is missing: CPU torch 2.13.0 first, then the project with its test extra.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: demo test venv bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'

venv: $(PY)

demo: $(PY)
	$(VENV)/bin/surgeon train -o runs/demo-adapter

test: $(PY)
	$(PY) -m pytest tests

bench: $(PY)
	$(PY) tools/bench/bench_train.py

clean:
	rm -rf runs .pytest_cache
