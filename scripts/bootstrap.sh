#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install the project into it.
#
#   scripts/bootstrap.sh          runtime dependencies only (what `scripts/flowshard` needs)
#   scripts/bootstrap.sh test     plus the test extras: pytest, hypothesis, ruff, mypy, matplotlib, openai
#
# Idempotent: re-runs pip only when pyproject.toml changed since the last install, or when the test
# extras are asked for and not yet installed. Progress goes to stderr. The venv is made with $PYTHON
# (default python3), which must be Python 3.11 or later.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.installed-from"
python="${PYTHON:-python3}"
level="${1:-runtime}"
case "$level" in
    runtime) extras="" ;;
    test) extras="[test]" ;;
    *) echo "usage: scripts/bootstrap.sh [runtime|test]" >&2; exit 2 ;;
esac
hash="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
# a venv with the test extras also serves the runtime; one with the runtime only does not serve tests
if [ "$have" = "$hash test" ] || [ "$have" = "$hash $level" ]; then
    exit 0
fi
say() { echo "flowshard setup: $*" >&2; }
recent() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -x "$venv/bin/python" ] && ! recent "$venv/bin/python"; then
    # (left by a run with an older Python: pip refused to install, and every later run reused it)
    say "$venv has $("$venv/bin/python" --version 2>&1); flowshard needs Python 3.11 or later: making it again"
    rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    if ! recent "$python"; then
        say "$python is $("$python" --version 2>/dev/null || echo 'not found'); flowshard needs Python 3.11 or later:" \
            "run with PYTHON=/path/to/python3.11 (or later)"
        exit 1
    fi
    say "creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi
if [ -n "$extras" ]; then
    say "installing flowshard with its test tools into .venv (first run only, about a minute)"
else
    say "installing flowshard and its runtime dependencies into .venv (first run only, about 20 s)"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip >&2
# pip's own progress, trimmed to one line per step: each package collected, the build, the install
log="$venv/.install.log"
if ! "$venv/bin/python" -m pip install --progress-bar off --disable-pip-version-check -e "$root$extras" \
        > >(tee "$log" | grep --line-buffered -E '^ *(Collecting|Building|Installing|Successfully)' >&2) 2>&1; then
    cat "$log" >&2
    say "installation failed (pip's whole output above)"
    exit 1
fi
echo "$hash $level" > "$stamp"
say "ready"
