#!/usr/bin/env bash
# `make test`: lint, then the whole Rust suite against a moto emulator and a
# PostgreSQL server that this script starts on free loopback ports and stops
# on exit, then the CDK app's checks. Installs what it needs: a Python venv
# for moto and the openai SDK, npm packages (the openai Node SDK, the CDK
# app's), Debian's postgresql package when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=infra/moto.sh
source infra/moto.sh
# shellcheck source=infra/postgres.sh
source infra/postgres.sh
moto_install
pg_install

# The official openai Node SDK that tests/e2e_sdk.rs drives, as pinned in
# its lockfile; installed again only when the lockfile changed.
sdk=tests/sdk/node
if ! cmp -s "$sdk/package-lock.json" "$sdk/node_modules/.installed-lock" 2>/dev/null; then
  echo "== installing the openai Node SDK into $sdk/node_modules"
  (cd "$sdk" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$sdk/package-lock.json" "$sdk/node_modules/.installed-lock"
fi

echo "== lint"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings

pg_start
moto_start
echo "== cargo test"
# Everything but the kill storms, which come last on a moto of their own: they
# are its heaviest users, and one moto for the whole suite grew to 11 GB.
RATEPOOL_VENV="$venv" cargo test --locked -- --skip server_killed_again_and_again --skip killed_at_random
moto_stop
moto_start
echo "== cargo test --test chaos_kill_storm"
cargo test --locked --test chaos_kill_storm

echo "== cdk"
RATEPOOL_VENV="$venv" bash cdk/scripts/check.sh
