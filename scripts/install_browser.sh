#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the browser test (tests/test_chat_web.py).
# Installs Debian's `chromium` and `chromium-driver` with apt-get when they are missing and this
# runs as root; anywhere else it says what to install and exits 1.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
browser_found() { (have chromium || have chromium-browser || have google-chrome) && have chromedriver; }

if browser_found; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! have apt-get; then
  echo "install_browser.sh: Chromium and chromedriver are missing; install them as root with" \
       "'apt-get install -y chromium chromium-driver' (Debian; Ubuntu: chromium-browser" \
       "chromium-chromedriver), or set JAXLM_CHROME and JAXLM_CHROMEDRIVER to their paths" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# a fresh machine may have no package lists yet: update once if the first try finds nothing
apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }
browser_found
