#!/usr/bin/env bash
# Debian's chromium + chromedriver for the MLflow UI browser test (tests/test_mlflow_server.py).
# Installs them with apt (sudo when not root) unless present; without apt it says so and the
# browser test skips with that reason.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_browser.sh: no apt-get here: install chromium + chromedriver yourself, or the browser test skips" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get install -y --no-install-recommends chromium chromium-driver \
  || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends chromium chromium-driver; }
