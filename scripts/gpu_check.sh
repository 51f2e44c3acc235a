#!/usr/bin/env bash
# The GPU check in one command (docs/gpu.md). On the device machine, with gpu-kit/ carried (`make gpu-kit`):
#   bash scripts/gpu_check.sh                  # installs gpu-kit/wheels offline, then the stages; results in $OUT
#   bash scripts/gpu_check.sh --dry-run        # here, on the CPU: no install, tiny settings (make gpu-check-dry)
# Extra arguments go to scripts/gpu_check.py (--out DIR, --budget_s N).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${GPU_CHECK_OUT:-/tmp/gpu-check-out}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
case " $* " in
*" --dry-run "*) ;;
*)
    # Into a folder of its own, first on PYTHONPATH: the image's packages stay as they are, and the carried
    # versions (peft's pin among them) win. --no-deps: the list is the closure already (scripts/gpu_kit.py).
    SITE=/tmp/lora-kit-site
    {
        echo "python: $(command -v "$PY") $("$PY" -V 2>&1)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            gpu-kit/wheels/*.whl 2>&1
        echo "pip install rc=$?"
        PYTHONPATH="$SITE" "$PY" -m pip check 2>&1
        echo "pip check rc=$? (conflicts are reported, not fatal: the stages show whether they matter)"
    } >"$OUT/install.log" 2>&1
    tail -3 "$OUT/install.log"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    ;;
esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py --out "$OUT" "$@"
