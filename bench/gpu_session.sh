#!/usr/bin/env bash
# Everything that needs a GPU, in one run that fits a short device lease (about 8 minutes on an H100/H200):
# parity on the GPU (float32 and bfloat16 against the PyTorch reference), Flax against PyTorch bfloat16 on the
# same card (mid checkpoint), and throughput/MFU of the full-size model at full batch.
#   bash bench/gpu_session.sh        (from the repository root; uses the machine's python3)
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, flax, transformers, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
echo "== parity on the GPU (tiny checkpoint, end to end) =="
timeout 200 $PY -m pytest tests/test_parity.py -q -x -p no:cacheprovider -k "end_to_end or spliced or vision_tower or decoder" 2>&1 | tail -4
cd bench
echo "== Flax vs PyTorch, bfloat16, mid checkpoint =="
timeout 240 $PY model_vs_reference.py --size mid --repeats 5 2>&1 | grep -v -i warn | tail -9
echo "== full-size throughput and MFU =="
timeout 240 $PY gpu.py --size full --seconds 8 2>&1 | tail -9
