# make run:  install blobserve in a virtual environment and start it with
#            defaults (flags in ARGS="...").
# make test: install everything the tests need (the Debian packages missing,
#            never upgrading one; Python packages) and run every check: lint, types, unit and integration
#            tests, and a tiny run of the benchmark.
# make bench: install what the benchmark needs and run it (flags in ARGS="...",
#            see `python -m bench --help`); the table goes to stdout, the
#            figures to bench-results.json.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_PACKAGES := apache2-utils chromium containerd docker-registry haproxy nginx-light skopeo systemd trafficserver varnish wrk

.PHONY: run test bench debian-packages

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

run: $(BIN)/python
	$(BIN)/pip install --quiet .
	$(BIN)/twistd --nodaemon --pidfile= blobserve $(ARGS)

# Only packages that are not installed are installed, and none of those named
# here is upgraded (--no-upgrade; apt may still upgrade a library one of the
# missing ones needs). A
# package removed but not purged ("deinstall ok config-files") counts as
# missing.
debian-packages:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q '^install ok installed$$' \
	    || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then \
	  echo "Debian packages: all installed ($(DEBIAN_PACKAGES))"; \
	else \
	  echo "Debian packages: installing the missing ones:$$missing"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-upgrade --no-install-recommends $$missing; fi

test: debian-packages $(BIN)/python
	$(BIN)/pip install --quiet '.[test]'
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@# pytest exits 5 when it collected no tests: that is a failure here.
	$(BIN)/pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; \
	exit $$status
	$(BIN)/python -m bench --smoke --out $(VENV)/bench-smoke.json

bench: debian-packages $(BIN)/python
	$(BIN)/pip install --quiet .
	$(BIN)/python -m bench $(ARGS)
