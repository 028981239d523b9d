#!/usr/bin/env bash
# Every check that needs a GPU, in one go (not run yet; estimated 7-8 min on one H200): the CUDA tests, the D2H path
# against a pinned copy (benchmarks/d2h.py), generate() overhead on CUDA (benchmarks/overhead.py --device cuda), a
# prefill whose states come faster than the writer takes them (benchmarks/prefill_flood.py --device cuda), and the
# host's write rates (benchmarks/write_rate.py) on a machine with more cores and memory bandwidth than the CPU VM.
#
#     bash benchmarks/device_check.sh [LOG_DIR]        # logs default to ./device-check
#
# It runs from a plain checkout without installing anything (GPU machines often have no package index): the
# repository is put on PYTHONPATH through a link named loopscope, and the machine's own torch, transformers, h5py,
# rich, typer and matplotlib are used. PYTHON picks the interpreter (default python3). Each step has a time limit,
# a failing step does not stop the others, and the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-device-check}
mkdir -p "$logs"
pkg=$(mktemp -d)
ln -s "$PWD" "$pkg/loopscope"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to LOG_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($*)"
    timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" = 0 ] || status=1
}

step gpu 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step versions 60 "$python" -c "import torch, transformers, h5py, loopscope; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'h5py', h5py.__version__, \
'loopscope from', loopscope.__file__)"
step tests 240 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_capture.py tests/test_huginn.py
step d2h 150 "$python" benchmarks/d2h.py --repeats 3
step overhead 300 "$python" benchmarks/overhead.py --device cuda --repeats 3 --large-new-tokens 256
# states made on the GPU faster than the writer stores them: back-pressure, bounded memory, dtype=/step_stride=/tokens=
step prefill_flood 90 "$python" benchmarks/prefill_flood.py --device cuda --repeats 1
# the host side on a bigger machine: does the memory-bandwidth cap of a two-copy capture lift with 16 cores?
step write_rate 120 "$python" benchmarks/write_rate.py --no-codecs --repeats 5
rm -rf "$pkg"
exit $status
