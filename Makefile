# ratepool — the two commands a new user needs are `make run` and `make test`.

CARGO    ?= cargo
CONFIG   ?= examples/ratepool.toml
BIN      := target/release/ratepool
KEY_FILE := .ratepool/tenant.key

.PHONY: build run submit test bench fuzz clean cdk-deps cdk-bootstrap lambda-bundle synth deploy-keys deploy

build:
	$(CARGO) build --release --locked

# A random tenant key, created once, readable only by you.
$(KEY_FILE):
	@mkdir -p .ratepool
	@umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > $(KEY_FILE)
	@echo "created a tenant API key in $(KEY_FILE)"

## The server (API + workers, SQLite in .ratepool/), with the built-in
## simulator unless ORG_A_KEY/ORG_B_KEY/ORG_C_KEY are set.
run: build $(KEY_FILE)
	@echo "submit the example from another terminal with: make submit"
	@SCREENPLAYS_API_KEY="$$(cat $(KEY_FILE))" $(BIN) serve --config $(CONFIG)

## Submit the example screenplay job to `make run`'s server and watch it.
submit: $(KEY_FILE)
	@test -x $(BIN) || $(CARGO) build --release --locked
	RATEPOOL_API_KEY_FILE=$(KEY_FILE) $(BIN) submit examples/screenplay.json --wait

## Everything CI runs: lint, the Rust suite against a moto emulator the
## script starts and stops, the CDK checks. Installs its own tools (venv, npm).
test:
	infra/test.sh

## The benchmark behind BENCHMARKS.md: a release build, BENCH_RUNS runs of
## every figure (about 25 minutes for 3), with its own moto for the DynamoDB
## figures and its own PostgreSQL server for the PostgreSQL ones (6 and 12). The tables go to stdout and target/bench/report.md, every
## run's numbers to target/bench/results.json. BENCH_ARGS="--only scaling" etc.
BENCH_RUNS ?= 3
BENCH_ARGS ?=
bench:
	$(CARGO) build --release --locked
	@mkdir -p target/bench
	bash -c 'set -euo pipefail; source infra/moto.sh; source infra/postgres.sh; moto_install; pg_install; \
	  pg_start; moto_start; $(BIN) bench --runs $(BENCH_RUNS) $(BENCH_ARGS) | tee target/bench/report.md'

## A long kill storm on every backend (tests/chaos_kill_storm.rs): processes
## SIGKILLed CHAOS_KILLS times while CHAOS_JOBS jobs of CHAOS_STEPS steps run.
## Starts and stops its own moto and PostgreSQL, like `make test`. `make test`
## runs the 20-kill storm on every backend; this one is longer (RELIABILITY.md).
CHAOS_KILLS ?= 200
CHAOS_JOBS  ?= 50
CHAOS_STEPS ?= 12
chaos:
	bash -c 'set -euo pipefail; source infra/moto.sh; source infra/postgres.sh; moto_install; pg_install; \
	  pg_start; moto_start; RATEPOOL_CHAOS_KILLS=$(CHAOS_KILLS) RATEPOOL_CHAOS_JOBS=$(CHAOS_JOBS) RATEPOOL_CHAOS_STEPS=$(CHAOS_STEPS) \
	  $(CARGO) test --locked --test chaos_kill_storm -- --include-ignored --nocapture --test-threads=1'

## Fuzz the parsers of untrusted input (fuzz/: spec_parse, template_render,
## rate_limit_headers) for FUZZ_SECS each. cargo-fuzz wants a nightly
## compiler (-Z sanitizer flags); RUSTC_BOOTSTRAP=1 lets the stable one
## accept them. Needs `cargo install cargo-fuzz`. Starts from the committed
## fuzz/seeds/TARGET/; the corpus grows in fuzz/corpus/TARGET/ and crashes
## land in fuzz/artifacts/TARGET/ (both ignored).
FUZZ_SECS    ?= 60
FUZZ_TARGETS ?= spec_parse template_render rate_limit_headers
fuzz:
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t && \
	  (cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t corpus/$$t seeds/$$t -- -max_total_time=$(FUZZ_SECS)) || exit 1; \
	done

# ---------------------------------------------------------------- AWS (cdk/)
CDK_ARGS   ?=
LAMBDA_DIR := dist/lambda
PLATFORM   ?= linux/arm64
# Synth runs `ratepool config check` with the binary `build` just made.
CDK_BUILT  := cd cdk && CDK_DISABLE_VERSION_CHECK=1 RATEPOOL_BIN=$${RATEPOOL_BIN:-$(CURDIR)/$(BIN)} node_modules/.bin/cdk

cdk-deps:
	@test -d cdk/node_modules || (cd cdk && npm ci --no-audit --no-fund)

## Once per account and region. Bootstrap synthesizes the app, so it checks
## the config file with the binary `build` makes, as synth does.
cdk-bootstrap: build cdk-deps
	$(CDK_BUILT) bootstrap $(CDK_ARGS)

## The Lambda's bootstrap (provided.al2023, arm64), built in Docker where the deploy runs.
lambda-bundle:
	docker build --platform $(PLATFORM) -f infra/Dockerfile --target lambda-bundle \
	  --output type=local,dest=$(LAMBDA_DIR) .

## Templates in cdk/cdk.out, offline: no credentials, no Docker (a placeholder
## Lambda bundle unless lambda-bundle ran). Synth checks the config file
## (-c ratepool:configFile=FILE, default examples/aws.toml) with the release
## binary's `ratepool config check`, hence `build` first.
synth: build cdk-deps
	$(CDK_BUILT) synth --quiet $(if $(wildcard $(LAMBDA_DIR)/bootstrap),,-c ratepool:lambdaAsset=cdk/test/fixtures/lambda-placeholder) $(CDK_ARGS)

## First deploy only: the two secrets the keys go in (TenantKeys, WorkerKeys).
deploy-keys: build cdk-deps
	$(CDK_BUILT) deploy RatepoolKeys $(CDK_ARGS)

deploy: build lambda-bundle cdk-deps
	$(CDK_BUILT) deploy --all --require-approval broadening $(CDK_ARGS)

clean:
	$(CARGO) clean
	rm -rf .ratepool
