# Sourced by the other scripts: makes ./.venv and installs bundlesync (editable) into it once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# An editable install leaves bundlesync's own modules uncompiled; where PYTHONDONTWRITEBYTECODE is set
# (some CI machines set it) every `bundlesync` process would then compile them again, about 0.1 s of
# CPU per command (the tests start about a thousand). compileall rewrites only what changed.
"$VENV/bin/python" -m compileall -q "$ROOT/bundlesync"
