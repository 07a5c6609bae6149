# aico-gateway — run `make run` or `make test` on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STATE  ?= ./var
STAMP  := $(VENV)/.installed
# sslyze pins an older cryptography and nassl: it gets a venv of its own (tests/test_sslyze.py).
SSLYZE_VENV  := .venv-sslyze
SSLYZE_STAMP := $(SSLYZE_VENV)/.installed

.PHONY: run test lint proto proto-check bench clean

$(STAMP): setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/twistd $(if $(filter json,$(LOG)),--logger aico.gateway.logs.json_observer) -n --pidfile= aico-gateway --state-dir $(STATE)

lint: $(STAMP) proto-check
	$(VENV)/bin/ruff check aico tests twisted
	$(VENV)/bin/mypy aico

$(SSLYZE_STAMP):
	@test -x $(SSLYZE_VENV)/bin/python || $(PYTHON) -m venv $(SSLYZE_VENV)
	$(SSLYZE_VENV)/bin/python -m pip install -q 'sslyze>=6.3,<7'
	@touch $(SSLYZE_STAMP)

$(SSLYZE_VENV): $(SSLYZE_STAMP)

# tests/test_deploy.py checks deploy/*.service with systemd-analyze (Debian's systemd
# package, installed where it is missing); tests/test_admin_ui.py drives Debian's headless
# chromium through chromedriver (installed where missing).
test: lint $(SSLYZE_STAMP)
	@command -v systemd-analyze >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd; }
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }
	$(VENV)/bin/python -m aico.dev.runtests -j2 tests

proto: $(STAMP)
	rm -rf aico/proto/aico
	$(PY) -m aico.dev.genproto proto aico/proto

proto-check: $(STAMP)
	$(PY) -m aico.dev.genproto --check proto aico/proto

bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(PY) -m aico.bench

clean:
	rm -rf $(VENV) $(SSLYZE_VENV) build *.egg-info _trial_temp*
