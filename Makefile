# `make demo` runs the main job end to end; `make test` runs the test suite.
# Both create .venv, install the pinned Python packages and, when missing, the system
# packages they need (redis-server, libtommath1 and ICU for the embedded Firebird engine, which
# dlopens ICU: libicu-dev pulls in the release's libicuNN whatever its number; for the
# tests also LibreOffice Calc, which makes workbooks the way another tool than openpyxl does,
# and firebird3.0-server, whose server binary the tests start privately on a free loopback
# port to stop and kill it; they never use the package's own service, whether or not it
# runs. Non-interactive, its debconf question is not asked and the package gives its own
# service's SYSDBA a random password, which the tests do not need; prometheus, which the
# tests start privately to scrape the exporter, chromium, which renders `etl report`,
# iproute2, whose `ip` makes the network namespaces of the multi-host test, and
# redis-sentinel, whose sentinels the failover tests start privately, never its service).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := redis-server libtommath1

.PHONY: demo test lint bench system-deps venv clean

demo: venv
	$(VENV)/bin/etl demo

# Target-specific, so it reaches the system-deps prerequisite of `make test` only.
test: NEED_TEST_PACKAGES := 1
test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The pipeline against one process and against dlt on the same Firebird file (benchmarks/
# README.md). CLAIMS=1000000 BENCH_ARGS="--resilience both" for the full run.
CLAIMS ?= 200000
bench: venv
	$(PY) -m pip install -q --group bench
	$(PY) -m benchmarks.pipeline --claims $(CLAIMS) $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy etl_tasks workers beat_schedule.py

# DEBIAN_FRONTEND goes through `env`: sudo would drop it from the environment, and
# firebird3.0-server's debconf would then ask for a password.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	/sbin/ldconfig -p 2>/dev/null | grep -q 'libtommath.so.1 ' || missing="$$missing libtommath1"; \
	/sbin/ldconfig -p 2>/dev/null | grep -q 'libicuuc.so.[0-9]' || missing="$$missing libicu-dev"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$(NEED_TEST_PACKAGES)" ]; then \
	  command -v soffice >/dev/null 2>&1 || missing="$$missing libreoffice-calc-nogui"; \
	  { [ -x /usr/sbin/firebird ] && command -v isql-fb >/dev/null 2>&1; } || \
	    missing="$$missing firebird3.0-server"; \
	  command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	  command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  command -v redis-sentinel >/dev/null 2>&1 || missing="$$missing redis-sentinel"; \
	fi; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; }; then \
	    echo "Installing system packages:$$missing"; \
	    $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else \
	    echo "Missing system packages:$$missing. Install them (Debian/Ubuntu: apt-get install --no-install-recommends$$missing) and run make again." >&2; \
	    exit 1; \
	  fi; \
	fi

venv: system-deps $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python 3.11 or newer is needed (set PYTHON=python3.11)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=25.1"
	$(PY) -m pip install -q -e . --group dev
	touch $@

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
