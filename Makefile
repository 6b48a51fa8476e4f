# make demo: fine-tune the embedded tiny GPT-2 on the bundled text, show the loss drop, export it to ONNX with
#            a KV cache and generate through ONNX Runtime with the trained adapter and without it.
# make test: the whole test suite (12-16 minutes on 2 cores).
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

DEMO_PROMPT ?= Day 12, noon. Wind

demo: $(PY)
	$(VENV)/bin/surgeon train -o runs/demo-adapter
	$(VENV)/bin/surgeon export tiny-gpt2 runs/demo-adapter -o runs/demo-onnx --kv-cache --force
	$(VENV)/bin/surgeon generate runs/demo-onnx --base --adapter demo-adapter --prompt "$(DEMO_PROMPT)" -n 30

test: $(PY)
	$(PY) -m pytest tests

bench: $(PY)
	$(PY) tools/bench/bench_train.py

clean:
	rm -rf runs .pytest_cache
