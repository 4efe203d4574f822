# Two entry points (see README): `make demo` and `make test`. Both create .venv once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean-venv

venv: $(STAMP)

# torch/torchvision are pinned to the builds on this machine's disk (see README, "Installation").
$(STAMP): setup.cfg pyproject.toml requirements-torch.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-torch.txt
	$(BIN)/python -m pip install -q -c requirements-torch.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-fedseg fit --config configs/fedavg.yaml

# pytest exits 5 when it collects no test: not a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -q; status=$$?; [ $$status -eq 5 ] && exit 0; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check lightning_fedseg tests benchmarks
	$(BIN)/ruff format --check lightning_fedseg tests benchmarks
	$(BIN)/mypy

clean-venv:
	rm -rf $(VENV)
