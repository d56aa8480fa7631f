#!/usr/bin/env bash
# Installs Autobahn|Testsuite's wstest into a Python 2.7 virtualenv under a cache directory.
#
# Why Python 2.7: autobahntestsuite (25.10.1, the latest) runs on Python 2 only, and pins its own
# dependencies exactly (Twisted 19.10.0, autobahn 0.10.9, cryptography 3.3.2, ...), so installing
# that one pinned version installs the same tree every time. The machine image ships Python 2.7
# through pyenv; WSPROXY_PYTHON2 names another interpreter.
#
# Takes about 35 s from nothing (wsaccel is compiled; the rest are wheels).
#
# Prints the path of the installed wstest on its last line. Idempotent: a finished install (marked
# by a stamp file naming the pinned versions) is reused; a half-finished one is redone.
#
#   bash tests/autobahn/install.sh            # installs to ~/.cache/wsproxy/autobahn
#   WSPROXY_AUTOBAHN_HOME=/somewhere bash tests/autobahn/install.sh
set -euo pipefail

HOME_DIR="${WSPROXY_AUTOBAHN_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/wsproxy/autobahn}"
VENV="$HOME_DIR/venv"
STAMP="$VENV/.wsproxy-installed"

# The last releases that still run on Python 2.7: virtualenv 16 is a single module that needs no
# dependencies of its own, pip 20.3 is the last pip for Python 2.
VIRTUALENV_PIN="virtualenv==16.7.12"
PIP_PIN="pip==20.3.4"
REQUIREMENTS="$(cd "$(dirname "$0")" && pwd)/requirements-py27.txt"
# A changed pin list makes a new install.
WANT="$VIRTUALENV_PIN $PIP_PIN $(grep -v '^#' "$REQUIREMENTS" | tr '\n' ' ')"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/wstest" ]; then
    echo "$VENV/bin/wstest"
    exit 0
fi

find_python2() {
    if [ -n "${WSPROXY_PYTHON2:-}" ]; then
        echo "$WSPROXY_PYTHON2"
        return
    fi
    local candidate
    for candidate in \
        "$(command -v pyenv >/dev/null 2>&1 && pyenv root 2>/dev/null)/versions/2.7.18/bin/python" \
        "$HOME/.pyenv/versions/2.7.18/bin/python" \
        /root/.pyenv/versions/2.7.18/bin/python \
        "$(command -v python2.7 || true)" \
        "$(command -v python2 || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return
        fi
    done
    echo "install.sh: no Python 2.7 found; install one (pyenv install 2.7.18) or set WSPROXY_PYTHON2" >&2
    exit 1
}
PY2="$(find_python2)"
"$PY2" -c 'import sys; assert sys.version_info[:2] == (2, 7), sys.version' || {
    echo "install.sh: $PY2 is not Python 2.7; set WSPROXY_PYTHON2 to a Python 2.7 interpreter" >&2
    exit 1
}

rm -rf "$VENV" "$HOME_DIR/bootstrap"
mkdir -p "$HOME_DIR"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# virtualenv goes into a side directory, not into the interpreter's own site-packages: the
# machine's Python 2.7 stays as it was.
# pip on Python 2 warns on every call that Python 2 is over, and about index folders of this
# machine's pip config that hold no such package: noise, kept out of CI's log.
quiet() {
    "$@" 2> >(grep -v -e 'is ignored: it is neither a file nor a directory' \
        -e '^DEPRECATION: Python 2.7' >&2)
}
quiet "$PY2" -m pip install --quiet --target "$HOME_DIR/bootstrap" "$VIRTUALENV_PIN"
PYTHONPATH="$HOME_DIR/bootstrap" "$PY2" -m virtualenv --quiet --no-download "$VENV"
quiet "$VENV/bin/python" -m pip install --quiet "$PIP_PIN"
# Every package pinned, none chosen by pip: the same tree on every machine.
quiet "$VENV/bin/python" -m pip install --quiet --no-deps -r "$REQUIREMENTS"
quiet "$VENV/bin/python" -m pip check >/dev/null
"$VENV/bin/wstest" --help >/dev/null
echo "$WANT" >"$STAMP"
echo "$VENV/bin/wstest"
