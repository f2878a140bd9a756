#!/usr/bin/env bash
# The GPU check, in one go on a machine with one CUDA GPU and a fresh checkout (no network, no Ray):
#
#   bash bench/gpu_check.sh            # from the repository root; BUDGET_S=300 by default
#
# 1. prerequisites: python3 with a CUDA torch, transformers, peft, safetensors, tokenizers, pytest,
#    pyyaml, pydantic (nothing is installed here; a missing package stops the check with what to carry);
# 2. builds the native ops with their CUDA kernels for this GPU (RAYLM_OPS=native: a failed build fails);
# 3. pytest -m gpu tests/gpu: CUDA ops vs references (opcheck), engine greedy == generate on CUDA,
#    the FlashAttention path, int4/int8 on CUDA, one LoRA step;
# 4. bench/gpu_decode.py: engine vs transformers generate (static cache, bf16, eager; compiled when the
#    budget allows) at batch 1 and 32 concurrent, one LoRA training step; writes docs/benchmarks/gpu.md
#    and gpu.json, and fails when a target is missed (batch 1 >= 2x eager generate, 32 concurrent >=
#    10x batch 1).
# Only ops/ runs (it never imports Ray). The step logs are under .cache/gpu_check/.
#
# pydantic (ops.quantization needs it) is missing from some GPU images. Carry it as wheels: on a
# machine with pip and network, in the repository root,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection
# then on the GPU machine, before this script:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-300}
START=$(date +%s)
left() { local l=$(( BUDGET_S - ($(date +%s) - START) )); echo $(( l > 1 ? l : 1 )); }
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAYLM_OPS=native
export RAYLM_BUILD_CACHE=${RAYLM_BUILD_CACHE:-$PWD/.cache/raylm/build}
LOGS=.cache/gpu_check
mkdir -p "$LOGS"
checks=""
note() { echo "$1"; checks+="$1"$'\n'; }

echo "== 1/4 prerequisites"
if ! $PY - <<'PYEOF'; then exit 2; fi
import importlib.util
import sys

need = {"torch": "torch", "transformers": "transformers", "peft": "peft", "safetensors": "safetensors",
        "tokenizers": "tokenizers", "pytest": "pytest", "yaml": "pyyaml", "pydantic": "pydantic"}
missing = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
if missing:
    print(f"missing Python packages: {', '.join(missing)}; nothing is installed by this check.")
    if "pydantic" in missing:
        print("carry pydantic as wheels: see the header of bench/gpu_check.sh")
    sys.exit(1)
import torch
import transformers

if not torch.cuda.is_available() or torch.version.cuda is None:
    print(f"torch {torch.__version__} sees no CUDA device")
    sys.exit(1)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}, "
      f"transformers {transformers.__version__}")
PYEOF

echo "== 2/4 native ops (CPU + CUDA) build"
t0=$(date +%s)
if timeout "$(left)" $PY -c "
from ops import native_build as nb
b = nb.backend()
assert 'cuda' in b.devices, b.reason
print(b.name, '-', b.reason)" >"$LOGS/build.log" 2>&1; then
  note "native build: $(tail -n 1 "$LOGS/build.log") ($(( $(date +%s) - t0 )) s)"
else
  note "native build FAILED ($(( $(date +%s) - t0 )) s): $(tail -n 3 "$LOGS/build.log" | tr '\n' ' ')"
  exit 1
fi

echo "== 3/4 pytest -m gpu"
status=0
timeout "$(left)" $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs >"$LOGS/pytest.log" 2>&1 || status=1
note "pytest -m gpu: $(tail -n 1 "$LOGS/pytest.log")"
[ $status -ne 0 ] && grep -E "^(FAILED|ERROR)" "$LOGS/pytest.log" | head -20

echo "== 4/4 decode benchmark and LoRA step ($(left) s left)"
if [ "$(left)" -lt 60 ]; then
  note "benchmark not run: $(left) s of the ${BUDGET_S} s budget left"
  exit 1
fi
timeout "$(left)" $PY bench/gpu_decode.py --time-budget "$(( $(left) - 10 ))" --checks "$checks" \
  2>&1 | tee "$LOGS/bench.log" | grep -v -i warning
bench_status=${PIPESTATUS[0]}
[ "$bench_status" -ne 0 ] && status=1
echo "== done in $(( $(date +%s) - START )) s: $([ $status -eq 0 ] && echo PASSED || echo FAILED) (logs in $LOGS)"
exit $status
