# Sourced by infra/test.sh, `make chaos` and `make bench` (from the
# repository root): a throwaway PostgreSQL server for the suite.
#   pg_install  installs Debian's postgresql package if initdb is missing
#   pg_start    initdb in a temporary directory, starts the server on a free
#               loopback port (trust auth, user `ratepool`, fsync off: for
#               tests only), stops it and removes the directory when the
#               calling shell exits, and exports RATEPOOL_TEST_POSTGRES_URL;
#               each test creates a database of its own on it
#   pg_stop     stops it now
# initdb and postgres refuse to run as root: as root they run as the
# `postgres` user the package creates.

pg_bin() {
  local initdb
  initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)
  [[ -n $initdb ]] && dirname "$initdb"
}

pg_install() {
  if [[ -z $(pg_bin) ]]; then
    echo "== installing postgresql (Debian package)"
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo=sudo
    $sudo apt-get install -y --no-install-recommends postgresql > /dev/null \
      || { $sudo apt-get update > /dev/null && $sudo apt-get install -y --no-install-recommends postgresql > /dev/null; }
  fi
}

# Runs a PostgreSQL program as the user the server runs as.
pg_as() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_start() {
  local bin port
  bin=$(pg_bin)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  pg_dir=$(mktemp -d)
  [[ $(id -u) -eq 0 ]] && chown postgres "$pg_dir"
  pg_as "$bin/initdb" -D "$pg_dir/data" -A trust -U ratepool > "$pg_dir/initdb.log"
  # Enough connections for the kill storms (every process keeps a pool).
  pg_as "$bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
    -o "-p $port -k $pg_dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400" start > /dev/null
  pg_ctl_bin="$bin/pg_ctl"
  trap infra_stop EXIT
  echo "== postgresql on 127.0.0.1:$port"
  export RATEPOOL_TEST_POSTGRES_URL="postgres://ratepool@127.0.0.1:$port/postgres"
}

pg_stop() {
  if [[ -n ${pg_dir:-} ]]; then
    pg_as "$pg_ctl_bin" -D "$pg_dir/data" -m immediate stop > /dev/null 2>&1 || true
    mkdir -p target && cp "$pg_dir/log" target/postgres.log 2>/dev/null || true
    rm -rf "$pg_dir"
    pg_dir=
  fi
}

# Stops whatever the sourced scripts started (each start sets this trap).
infra_stop() {
  pg_stop
  if declare -F moto_stop > /dev/null; then moto_stop; fi
}
