#!/usr/bin/env bash
# Runs every test of portcullis, after installing what the tests need. Idempotent: safe to
# run again on a machine that already has everything.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# The real nginx origin of tests/canonical.rs (Debian puts the binary in /usr/sbin).
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx-light)
# The real Redis of the shared limit store tests (crates/limits/tests/redis.rs, tests/fleet.rs).
command -v redis-server >/dev/null 2>&1 || [[ -x /usr/bin/redis-server ]] || need_apt+=(redis-server)
# The real NATS server of the event sink tests (crates/events/tests/nats.rs; Debian: /usr/sbin).
command -v nats-server >/dev/null 2>&1 || [[ -x /usr/sbin/nats-server ]] || need_apt+=(nats-server)
# The real Alertmanager of the inbound events test (tests/events.rs; Debian: /usr/bin).
command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
# The real headless browser of the console tests (tests/console.rs; driven by playwright-core).
command -v chromium >/dev/null 2>&1 || [[ -x /usr/bin/chromium ]] || need_apt+=(chromium)
# Tests read the embedded store with the sqlite3 shell.
command -v sqlite3 >/dev/null 2>&1 || need_apt+=(sqlite3)
if ((${#need_apt[@]})); then
  echo "installing: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}"
fi

# Integration tests open many sockets.
ulimit -n 65536 2>/dev/null || true

# npm packages of the tests: the real OpenID Provider (tests/idp) and the browser driver
# (tests/browser). Each is installed when node_modules is missing or its lockfile changed
# since the last install.
npm_install() {
  local dir=$1
  [[ -f $dir/package.json ]] || return 0
  local stamp=$dir/node_modules/.installed-lock.sha256
  local want
  want=$(sha256sum "$dir/package-lock.json" 2>/dev/null | cut -d' ' -f1 || true)
  if [[ ! -d $dir/node_modules || ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
    echo "installing the npm packages of $dir"
    if [[ -f $dir/package-lock.json ]]; then
      npm ci --prefix "$dir" --no-audit --no-fund
    else
      npm install --prefix "$dir" --no-audit --no-fund
      want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
    fi
    echo "$want" >"$stamp"
  fi
}
npm_install tests/idp
npm_install tests/browser

cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"
