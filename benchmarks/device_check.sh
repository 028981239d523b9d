#!/usr/bin/env bash
# Every check that needs a GPU, in one go: the CUDA tests, the D2H path against a pinned copy (benchmarks/d2h.py),
# generate() overhead on CUDA at the target's size (benchmarks/overhead.py --sizes realistic: n_embd 2048, bf16,
# 32 steps), a prefill whose states come faster than the writer takes them (benchmarks/prefill_flood.py), and the
# host's write rates (benchmarks/write_rate.py) on a machine with more cores and memory bandwidth than the CPU VM.
#
#     bash benchmarks/device_check.sh [LOG_DIR]        # logs default to ./device-check (one per step, 7 files)
#
# Sized for a lent GPU machine with 15 minutes of device time, the machine's start included: the step limits add up
# to 330 s, so a second run fits if the first one fails. Not run on a GPU yet: the limits are estimates, and a step
# that reaches its limit is cut off (its log keeps what it printed) while the others go on.
#
# It runs from a plain checkout without installing anything (GPU machines often have no package index): the
# repository is put on PYTHONPATH through a link named loopscope, and the machine's own torch, transformers, h5py,
# rich, typer, matplotlib and pytest are used. PYTHON picks the interpreter (default python3). A failing step does
# not stop the others, and the exit status says whether all passed.
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

step gpu 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step versions 30 "$python" -c "import torch, transformers, h5py, loopscope; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'h5py', h5py.__version__, \
'loopscope from', loopscope.__file__)"
# only test_cuda.py uses the device (the rest of the suite runs on CI, without one)
step tests 50 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step d2h 45 "$python" benchmarks/d2h.py --repeats 3
# the target: <= 1.03 x plain at n_embd 2048, bf16, 32 steps
step overhead 90 "$python" benchmarks/overhead.py --device cuda --sizes realistic --repeats 3 --realistic-new-tokens 96
# states made on the GPU faster than the writer stores them: back-pressure, bounded memory, dtype=/step_stride=/tokens=
step prefill_flood 60 "$python" benchmarks/prefill_flood.py --device cuda --repeats 1
# the host side on a bigger machine: does the memory-bandwidth cap of a two-copy capture lift with 16 cores?
step write_rate 45 "$python" benchmarks/write_rate.py --no-codecs --repeats 3
rm -rf "$pkg"
exit $status
