#!/usr/bin/env bash
# tests/test_cuda.py on a GPU, one test per process (a CUDA fault poisons its process, so each test reports for
# itself) with synchronous launches (a fault names the kernel that made it). Exits non-zero if any test failed.
#   bash scripts/cuda_tests.sh        # on the device: PYTHONPATH=src bash scripts/cuda_tests.sh
set -uo pipefail
status=0
for t in $(python -m pytest tests/test_cuda.py --collect-only -q 2>/dev/null | grep '::'); do
  if CUDA_LAUNCH_BLOCKING=1 python -m pytest -q -p no:cacheprovider "$t" >/tmp/cuda-test.log 2>&1; then echo "PASS $t"
  else echo "FAIL $t"; grep -E "Error|assert|^E " /tmp/cuda-test.log | tail -15; status=1; fi
done
exit $status
