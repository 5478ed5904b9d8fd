# Sourced by infra/test.sh and `make chaos` (from the repository root): the
# test tools' venv and a moto emulator on a free loopback port.
#   moto_install  installs infra/requirements-test.txt into $venv if it changed
#   moto_start    starts moto (infra/moto_server.py: moto's server with
#                 atomic DynamoDB transactions and an account of what requests
#                 would cost on AWS; log in target/moto.log), stops it when the
#                 calling shell exits, and exports AWS_ENDPOINT_URL and dummy
#                 credentials for it
#   moto_stop     stops it now (moto keeps every table and queue of its run in
#                 memory: a fresh one for the heaviest tests keeps it small)
venv=${RATEPOOL_VENV:-.venv}

moto_install() {
  if ! cmp -s infra/requirements-test.txt "$venv/.installed" 2>/dev/null; then
    echo "== installing test tools into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r infra/requirements-test.txt
    cp infra/requirements-test.txt "$venv/.installed"
  fi
}

moto_start() {
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p target
  # moto's own server, with atomic DynamoDB transactions (see the script).
  "$venv/bin/python" infra/moto_server.py -H 127.0.0.1 -p "$port" >> target/moto.log 2>&1 &
  moto_pid=$!
  trap infra_stop EXIT
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/moto-api/" > /dev/null && break
    sleep 0.2
  done
  # One reset at the start; tests use their own table and queue names.
  curl -sf -X POST "http://127.0.0.1:$port/moto-api/reset" > /dev/null
  echo "== moto on 127.0.0.1:$port"
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
  export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
  # The tests rely on DynamoDB's atomic transactions: check them (~6 s).
  "$venv/bin/python" infra/moto_atomicity.py "$AWS_ENDPOINT_URL"
  # `ratepool bench` reports the account moto keeps of what requests would
  # cost on AWS (GET /_ratepool/usage): check it against the documented
  # DynamoDB item sizes (~1 s; leaves the account reset).
  "$venv/bin/python" infra/moto_capacity.py "$AWS_ENDPOINT_URL"
}

moto_stop() {
  if [[ -n ${moto_pid:-} ]]; then
    kill "$moto_pid" 2>/dev/null || true
    wait "$moto_pid" 2>/dev/null || true
    moto_pid=
  fi
}

# Stops whatever the sourced scripts started (infra/postgres.sh defines the
# same, with its server too).
if ! declare -F infra_stop > /dev/null; then
  infra_stop() { moto_stop; }
fi
