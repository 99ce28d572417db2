#!/usr/bin/env bash
# Everything that needs a GPU, in one run that fits a short device lease (about 9 minutes on an H200; the limits below are about 1.5x what each step took there):
# Flax against PyTorch bfloat16 on the same card (mid checkpoint, then the full-size one) with where the time goes
# and the least cosine between the two sides' vectors, throughput/MFU of the full-size model at full batch, and
# XLA flags side by side. Random checkpoints are built once ($BENCH_CHECKPOINTS). Logs go to $LOGS (default .).
#   bash bench/gpu_session.sh        (from the repository root; uses the machine's python3)
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
export BENCH_CHECKPOINTS=${BENCH_CHECKPOINTS:-/tmp/bench-checkpoints}
PY=${PYTHON:-python3}
LOGS=$(realpath "${LOGS:-.}")
mkdir -p "$LOGS" "$BENCH_CHECKPOINTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, flax, transformers, torch, tokenizers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, 'tokenizers', tokenizers.__version__)"
cd bench
step() {  # step NAME SECONDS COMMAND...: one benchmark, its log kept whatever happens
    local name=$1 limit=$2; shift 2
    echo "== $name =="
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -i -e warn -e "model of type" | tee "$LOGS/$name.log" | tail -22
    echo "($name: $((SECONDS - start)) s)"
}
step model_vs_reference_mid 180 $PY model_vs_reference.py --size mid --repeats 5
step model_vs_reference_full 300 $PY model_vs_reference.py --size full --repeats 5
step gpu_full 100 $PY gpu.py --size full --seconds 6
step xla_flags_full 160 $PY xla_flags.py --size full --repeats 20
