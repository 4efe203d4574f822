# Two entry points (see README): `make demo` and `make test`. Both create .venv once; `make test`
# also creates .venv-floor, the same packages with Lightning at the floor of the declared range.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The floor of `lightning` in setup.cfg; CI runs the federation and CLI tests on it.
FLOOR_LIGHTNING := 2.5.0
FLOOR := .venv-floor
FLOOR_STAMP := $(FLOOR)/.installed-$(FLOOR_LIGHTNING)
# What the floor environment runs: everything that touches Lightning's training loop or CLI.
FLOOR_TESTS := tests/federation tests/test_cli.py tests/test_module.py

.PHONY: demo test test-latest test-floor lint venv clean-venv

venv: $(STAMP)

# torch/torchvision are pinned to the builds on this machine's disk (see README, "Installation").
$(STAMP): setup.cfg pyproject.toml requirements-torch.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-torch.txt
	$(BIN)/python -m pip install -q -c requirements-torch.txt -e '.[dev,flare]'
	touch $(STAMP)

# The floor environment reuses .venv's packages (a .pth file adds its site-packages, after its own)
# and installs only the floor Lightning into its own site-packages, which comes first on sys.path.
$(FLOOR_STAMP): $(STAMP)
	rm -rf $(FLOOR)
	$(PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/python -c "import pathlib, sysconfig; base = '$(abspath $(VENV))'; \
	  lib = pathlib.Path(sysconfig.get_paths()['purelib']); rel = lib.relative_to(sysconfig.get_paths()['data']); \
	  (lib / 'zz_base_venv.pth').write_text(f\"import site; site.addsitedir('{base}/{rel}')\n\")"
	$(FLOOR)/bin/python -m pip install -q --no-deps 'lightning==$(FLOOR_LIGHTNING)'
	$(FLOOR)/bin/python -c "import lightning; assert lightning.__version__ == '$(FLOOR_LIGHTNING)', lightning.__file__"
	touch $(FLOOR_STAMP)

demo: $(STAMP)
	$(BIN)/lightning-fedseg fit --config configs/fedavg.yaml

# pytest exits 5 when it collects no test: not a failure.
test: test-latest test-floor

test-latest: $(STAMP)
	$(BIN)/python -c "import lightning; print('Lightning', lightning.__version__, '(latest): the whole suite')"
	$(BIN)/python -m pytest -q; status=$$?; [ $$status -eq 5 ] && exit 0; exit $$status

test-floor: $(FLOOR_STAMP)
	$(FLOOR)/bin/python -c "import lightning; print('Lightning', lightning.__version__, '(floor):', '$(FLOOR_TESTS)')"
	$(FLOOR)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS); status=$$?; [ $$status -eq 5 ] && exit 0; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check lightning_fedseg tests benchmarks
	$(BIN)/ruff format --check lightning_fedseg tests benchmarks
	$(BIN)/mypy

clean-venv:
	rm -rf $(VENV) $(FLOOR)
