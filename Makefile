# ratepool — the two commands a new user needs are `make run` and `make test`.

CARGO    ?= cargo
CONFIG   ?= examples/ratepool.toml
BIN      := target/release/ratepool
KEY_FILE := .ratepool/tenant.key

.PHONY: build run submit test lint unit clean

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

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --locked

## Everything CI runs.
test: lint unit

clean:
	$(CARGO) clean
	rm -rf .ratepool
