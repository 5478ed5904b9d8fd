#!/usr/bin/env bash
# `make test`: lint, then the whole Rust suite against a moto emulator that
# this script starts on a free loopback port and stops on exit, then the CDK
# app's checks. Installs what it needs: a Python venv for moto, npm packages.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=infra/moto.sh
source infra/moto.sh
moto_install

echo "== lint"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings

moto_start
echo "== cargo test"
# Everything but the kill storms, which come last on a moto of their own: they
# are its heaviest users, and one moto for the whole suite grew to 11 GB.
cargo test --locked -- --skip server_killed_again_and_again --skip workers_killed_at_random
moto_stop
moto_start
echo "== cargo test --test chaos_kill_storm"
cargo test --locked --test chaos_kill_storm

echo "== cdk"
RATEPOOL_VENV="$venv" bash cdk/scripts/check.sh
