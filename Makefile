# Needs only python3 and make: uv is bootstrapped into .tools/ when not on PATH.
UV_VERSION ?= 0.13.8
UV ?= $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
PYTEST_ARGS ?=
N ?= 1000
L ?= 2
C ?= 32
SAT_N ?= 5000
SAT_C ?= 256

export PREFECT_SERVER_ANALYTICS_ENABLED = false
export UV_LINK_MODE = copy

# make deploy BUCKET=… ENDPOINT=… REGION=… PULL=git REPO=… BRANCH=…; make worker LIMIT=…
# make stack-prod REPLICAS=2 WORKERS=2 LIMIT=1
BUCKET ?=
ENDPOINT ?=
REGION ?=
PULL ?=
REPO ?=
BRANCH ?=
LIMIT ?=
POOL ?=
REPLICAS ?= 2
WORKERS ?= 2

.PHONY: help sync system-deps run up down status deploy worker test lint format bench \
	bench-saturation clean stack-prod provision test-production

help:
	@echo "make run    start (or reuse) the local stack and process the sample invoices"
	@echo "make test   lint, then run the whole test suite against real local servers"
	@echo "make bench  benchmark the pipeline against the seed design (N=$(N) L=$(L) C=$(C))"
	@echo "            STACK=production: embedded vs production stack, 1/2/3 workers"
	@echo "make bench-saturation  seed vs pipeline CPU-bound (N=$(SAT_N) L=$(L) C=$(SAT_C))"
	@echo "make down   stop the local stack"
	@echo "make deploy create work pool, lock, blocks and the prefect.yaml deployments"
	@echo "             (on PREFECT_API_URL, else on the local stack)"
	@echo "make worker start a process worker on the invoices pool (LIMIT=runs at once)"
	@echo "make provision  bucket/blocks/lock on PREFECT_API_URL's server (BUCKET= ENDPOINT= REGION=)"
	@echo "make stack-prod Postgres + Redis + REPLICAS API replicas behind haproxy + WORKERS workers"
	@echo "make test-production  the full production-stack suite (600 invoices)"

$(CURDIR)/.tools/bin/uv:
	python3 -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.venv/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --all-extras
	@touch $@

sync: .venv/.synced

run: sync system-deps
	$(UV) run invoiceflow up
	$(UV) run invoiceflow run

up: sync
	$(UV) run invoiceflow up

down: sync
	$(UV) run invoiceflow down

# Without PREFECT_API_URL, deploy onto the local stack (started if needed).
DEPLOY_OPTIONS = $(if $(BUCKET),--bucket $(BUCKET)) $(if $(ENDPOINT),--endpoint-url $(ENDPOINT)) \
	$(if $(REGION),--region $(REGION)) $(if $(PULL),--pull $(PULL)) $(if $(REPO),--repo $(REPO)) \
	$(if $(BRANCH),--branch $(BRANCH))

# Without PREFECT_API_URL, deploy onto the local stack (started if needed; `invoiceflow up`
# reuses a running production stack's server instead of starting another).
deploy: sync
	@if [ -z "$$PREFECT_API_URL" ]; then $(UV) run invoiceflow up; fi
	$(UV) run invoiceflow deploy $(DEPLOY_OPTIONS)

provision: sync
	$(UV) run invoiceflow provision $(if $(BUCKET),--bucket $(BUCKET)) \
		$(if $(ENDPOINT),--endpoint-url $(ENDPOINT)) $(if $(REGION),--region $(REGION))

worker: sync
	$(UV) run invoiceflow worker $(if $(LIMIT),--limit $(LIMIT)) $(if $(POOL),--pool $(POOL))

stack-prod: sync system-deps
	$(UV) run invoiceflow up --production --replicas $(REPLICAS) --workers $(WORKERS) \
		--worker-limit $(or $(LIMIT),1)

status: sync
	$(UV) run invoiceflow status

lint: sync
	$(UV) run ruff check .
	$(UV) run ruff format --check .

format: sync
	$(UV) run ruff format .
	$(UV) run ruff check --fix .

# Debian packages the tests and the stacks run for real: chromium (UI tests, through
# Playwright's executable_path; its own browser download can't work here), Tesseract with
# the EN/DE/FR/NL language packs (OCR), PostgreSQL, Redis and haproxy (the production
# stack). Only what is missing is installed; on a machine that has them all this is a no-op.
DEBIAN_PACKAGES = chromium tesseract-ocr tesseract-ocr-eng tesseract-ocr-deu \
	tesseract-ocr-fra tesseract-ocr-nld postgresql redis-server haproxy
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)

system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

test: lint system-deps
	$(UV) run pytest $(PYTEST_ARGS)

# The full production-stack scale test (600 invoices, 6 runs, 3 workers); `make test`
# runs the same tests at a smaller N.
test-production: sync system-deps
	INVOICEFLOW_PRODUCTION_INVOICES=600 $(UV) run pytest -m production $(PYTEST_ARGS)

# make bench STACK=production: embedded vs production stack, BENCH_WORKERS workers each.
STACK ?= embedded
BENCH_WORKERS ?= 1,2,3

bench: sync
	$(UV) run python -m benchmarks.run --n $(N) --latency $(L) --concurrency $(C) \
		--stack $(STACK) $(if $(filter production,$(STACK)),--workers $(BENCH_WORKERS))

# Seed and pipeline side by side where CPU, not LLM latency, is the bound (issue 13).
bench-saturation: sync
	$(UV) run python -m benchmarks.saturation --n $(SAT_N) --latency $(L) --concurrency $(SAT_C)

clean: down
	rm -rf .invoiceflow .pytest_cache
