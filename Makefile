# The two commands a newcomer needs:  make run  (local stack)  and  make test.
# Both bootstrap everything on a fresh Debian machine: a venv with pinned
# packages, the npm packages of tests/js, and (for tests) Debian's chromium.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NODE_STAMP := tests/js/node_modules/.installed-stamp

.PHONY: run test lint venv node chromium bench clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

node: $(NODE_STAMP)
$(NODE_STAMP): tests/js/package-lock.json
	@command -v npm >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian's chromium for the browser test (root or sudo needed once).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

lint: venv
	$(BIN)/ruff check entrypoint tests bench

test: venv node chromium lint
	$(BIN)/pytest

run: venv node
	$(BIN)/python tests/devrun.py

bench: venv node
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) tests/js/node_modules .local
