# make demo:        fine-tune the embedded tiny GPT-2 on the bundled text, show the loss drop, export it to ONNX with
#                   a KV cache and generate through ONNX Runtime with the trained adapter and without it.
# make test:        the whole test suite, in .venv made from requirements.lock (the tested set), one pytest worker
#                   per core (pytest-xdist; a test file stays on one worker, so its fixtures are built once).
# make clients:     .venv-genai and .venv-optimum from tools/clients/*.lock (onnxruntime-genai needs the onnxruntime
#                   package, optimum-onnx pins transformers 4.x: neither fits .venv); the tests drive them in a subprocess.
# make lint:        the import contracts (pyproject's [tool.importlinter]: stages import only those below them,
#                   the ONNX Runtime side never imports torch).
# make test-latest: canary: .venv-latest with the newest releases (upper bounds ignored), quick parity subset.
# make test-floor:  canary: .venv-floor with every direct dependency at its pyproject floor, same subset.
# make lock:        re-resolve the newest releases within pyproject's ranges and rewrite requirements.lock.
# .venv is made when missing or older than requirements.lock: CPU torch first, then the lock, then surgeon.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-from-lock
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: demo test lint test-latest test-floor lock venv clients bench clean

$(STAMP): requirements.lock pyproject.toml
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

venv: $(STAMP)

DEMO_PROMPT ?= Day 12, noon. Wind

demo: $(STAMP)
	$(VENV)/bin/surgeon train -o runs/demo-adapter --force
	$(VENV)/bin/surgeon export tiny-gpt2 runs/demo-adapter -o runs/demo-onnx --kv-cache --force
	$(VENV)/bin/surgeon generate runs/demo-onnx --base --adapter demo-adapter --prompt "$(DEMO_PROMPT)" -n 30

# the client venvs the tests drive in a subprocess (onnxruntime-genai, optimum); each kept while its lock is unchanged
clients:
	python3 tools/clients.py ensure all

test: $(STAMP) clients
	$(PY) -m pytest tests -n auto --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/lint-imports

test-latest:
	python3 tools/deps.py canary latest

test-floor:
	python3 tools/deps.py canary floor

lock:
	python3 tools/deps.py lock

bench: $(STAMP)
	$(PY) tools/bench/bench_train.py

clean:
	rm -rf runs .pytest_cache .venv-latest .venv-floor .venv-lock .venv-genai .venv-optimum
