# Shared by scripts/demo and scripts/test: make ./.venv hold mer and what it needs.
# Idempotent: it reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extras="${1:-}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "mer: creating virtual environment in $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.mer-installed${extras:+-$extras}"
want="$(sha256sum < "$root/pyproject.toml" | cut -d' ' -f1)"
current() { [ -f "$1" ] && [ "$(cat "$1")" = "$want" ]; }
# An install with the test extras also satisfies a plain one.
if ! current "$stamp" && ! { [ -z "$extras" ] && current "$venv/.mer-installed-test"; }; then
  echo "mer: installing dependencies into $venv (first run takes a minute)" >&2
  # The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/pip" install -q "${MER_TORCH_SPEC:-torch==2.13.0}"
  fi
  "$venv/bin/pip" install -q -e "$root${extras:+[$extras]}"
  echo "$want" > "$stamp"
fi
