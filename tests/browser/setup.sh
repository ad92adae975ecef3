#!/usr/bin/env bash
# Makes the browser tests runnable: Debian's Chromium at /usr/bin/chromium
# (installed with apt when missing; `apt-get update` only if that install
# fails) and playwright-core from package-lock.json. No browser is ever
# downloaded by npm: playwright-core ships none.
# Exits 0 when ready; otherwise non-zero with the reason on stderr.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x /usr/bin/chromium ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y -qq chromium >/dev/null 2>&1; then
        $sudo apt-get update -qq >/dev/null 2>&1 || true
        $sudo apt-get install -y -qq chromium >/dev/null 2>&1 ||
            { echo "could not install Debian's chromium package" >&2; exit 1; }
    fi
fi
[ -x /usr/bin/chromium ] || { echo "/usr/bin/chromium is missing" >&2; exit 1; }

command -v node >/dev/null || { echo "node is not installed" >&2; exit 1; }
if [ ! -f node_modules/playwright-core/package.json ]; then
    npm ci --no-audit --no-fund --loglevel=error >/dev/null ||
        { echo "npm ci failed in tests/browser" >&2; exit 1; }
fi
