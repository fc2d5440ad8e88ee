# Two commands do all set-up on a fresh machine: `make quickstart` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch and torchvision are installed as a matched pair (the machine's pip caps them there).
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test quickstart lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PAIR)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

quickstart: $(STAMP)
	$(BIN)/nestune quickstart

lint: $(STAMP)
	$(BIN)/ruff check nestune tests bench runs

bench: $(STAMP)
	$(BIN)/python bench/forward_select.py
	$(BIN)/python bench/xnas_wipeout.py

clean:
	rm -rf $(VENV) nestune_runs
