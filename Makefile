# Natter: `make run` starts a demo server, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= deploy/natterd.demo.toml
STAMP := $(VENV)/.installed

.PHONY: install run test fuzz lint bench bench-compare clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/natterctl --config $(CONFIG) cert generate --if-missing
	$(BIN)/natterctl --config $(CONFIG) db upgrade
	@echo
	@echo "natterd is starting for the domain 'localhost' (STARTTLS on 5222, direct TLS on 5223)."
	@echo "In another terminal, add users with:"
	@echo "    $(BIN)/natterctl --config $(CONFIG) user add alice@localhost"
	@echo "then log in with any XMPP client as alice@localhost on 127.0.0.1:5222"
	@echo "(the certificate is self-signed: accept it in the client)."
	@echo
	$(BIN)/natterd --config $(CONFIG) run

# The suite holds the ports of `make run` while it runs (tests/ports.py), so a test that needs
# one fails here every time, not only beside a running demo. NATTER_TEST_TAKE_DEMO_PORTS=0: not.
NATTER_TEST_TAKE_DEMO_PORTS ?= 1
export NATTER_TEST_TAKE_DEMO_PORTS
# pytest-xdist workers; tests that cannot share the machine are in one xdist_group.
# PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= 2

test: $(STAMP) lint
	@./scripts/install-peers.sh
	@eval "$$(./scripts/test-services.sh)" && $(BIN)/pytest -q -p no:cacheprovider \
		-n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The long fuzzing campaign (docs/fuzzing.md): every fuzzer in tests/fuzz with the `fuzz`
# Hypothesis profile, NATTER_FUZZ_EXAMPLES examples each (scaled by @fuzz_budget), on
# PYTEST_WORKERS workers; test cases per fuzzer, failures, wall and CPU time go to FUZZ_REPORT.
FUZZ_REPORT ?= fuzz-report.json

fuzz: $(STAMP)
	@eval "$$(./scripts/test-services.sh)" && HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q \
		-p no:cacheprovider -m fuzz -n $(PYTEST_WORKERS) --fuzz-report $(FUZZ_REPORT) \
		$(PYTEST_ARGS) tests/fuzz
	@echo "fuzz: report in $(FUZZ_REPORT)"

lint: $(STAMP)
	$(BIN)/ruff check xmpp_server stun voip tests schema bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.load connect -c 1000
	$(BIN)/python -m bench.load chat -c 200 -m 200

# natterd, Prosody, ejabberd (and coturn for STUN) side by side; the table goes to
# docs/benchmarks.md. Installs the Debian packages it needs (root).
bench-compare: $(STAMP)
	@./scripts/install-bench-peers.sh
	$(BIN)/python -m bench.compare $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data .test-services
