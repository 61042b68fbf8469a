#!/usr/bin/env bash
# Issue 18's device work as one call (the device tool lends a GPU for about 15 minutes a session, start included):
#   run(command="bash bench/gpu_session.sh", carry=[".gpu-data"], timeout_s=580)         # benchmarks + kernel
#   run(command="bash bench/gpu_session.sh train", carry=[".gpu-data"], timeout_s=580)   # the 12-head family base
# after, once, here:  mkdir -p .gpu-data && cp ../shared/data/cifar10-jpeg.tar.gz .gpu-data/   (ignored by git)
# Every step has its own time limit and writes its output under $OUT, so a slow or failing step costs only itself.
# The machine's python3 has torch, timm, safetensors, accelerate and Triton but not gradio or plotly: nothing
# here imports them, and the package runs from the checkout (PYTHONPATH), not installed.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

step() {  # step NAME SECONDS COMMAND...: run it, keep its output, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "== $name: rc=$? in $((SECONDS - start)) s (limit $limit s)"
    tail -n 30 "$OUT/$name.txt"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c 'import torch, timm, triton; print("torch", torch.__version__, "timm", timm.__version__, "triton", triton.__version__)' >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if [ "${1:-}" = train ]; then  # configs/gpu-family-mha.yaml with the CLI; the fp16 model and metrics come back
    step train 540 python3 -m gqa_core.train --config configs/gpu-family-mha.yaml
    tar -czf "$OUT/gpu-family.tar.gz" runs/gpu-family/comparison.json runs/gpu-family/mha/model \
        runs/gpu-family/mha/metrics.json 2>/dev/null
    echo "== done in $SECONDS s"
    exit 0
fi

# 1. the routed kernel: correct against index + SDPA (fp16 / bf16, d 64 / 16, T 65 / 197 / 257) and timed
step kernel 90 python3 bench/kernel_check.py --batch 256
# 2. inference, bf16, batch 256, every variant next to timm's fused MHA (KDGQA also through the kernel)
step inference 180 python3 bench/bench_attention.py --device cuda --dtype bf16 --batch 256 --repeats 7 --iters 5 \
    --models vit_small_patch16_224 vit_base_patch16_224 vit_large_patch16_224
# 3. a training step (forward + backward + AdamW, bf16 autocast, batch 128)
step training 120 python3 bench/bench_train.py --device cuda --amp bf16 --batch 128 --repeats 5 --iters 3 \
    --models vit_small_patch16_224 vit_base_patch16_224
# 4. the app's analyses on the GPU equal the CPU's (float32, no TF32) for every family
step device_check 90 python3 bench/device_check.py
echo "== done in $SECONDS s"
