#!/usr/bin/env bash
# GPU check: the GPU tests, the pipeline benchmark with the stages sharing one GPU, then both
# engines on the GPU (bench.engines: the p2p engine's per-op cost with GPU stages; through host
# memory by gloo when they share one GPU, by NCCL with a GPU each), then float32 against bf16
# (bench.precision: rec-LRA and backprop on the digits, one seed). At most 12 minutes.
# Meant for a machine with torch and CUDA but no Ray (Python 3.12): put Ray's core and its few
# missing dependencies in .whl/ first (ray-core.tar.xz: the ray package from the ray wheel with
# jars, rllib, data, serve, llm, tune, train and the dashboard client removed; jsonschema,
# jsonschema-specifications, referencing and rpds-py wheels), then run `bash bench/gpu_check.sh`
# from the repository root. Results land in $OUT (default: bench/results).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p /tmp/site
tar xJf .whl/ray-core.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -8 | tee $OUT/gpu_tests.log
timeout 320 python3 -m bench.pipeline --json $OUT/pipeline_gpu.json --device cuda --steps 8 --rounds 2 --skip-time-to-accuracy --transport-timeout 45 2>&1 | grep -v "INFO\|WARNING" | tail -40 | tee $OUT/bench_gpu.log
timeout 160 python3 -m bench.engines --json $OUT/engines_gpu.json --device cuda --models resnet18_w64 --ks 2 --rounds 2 --steps 4 2>&1 | grep -v "INFO\|WARNING" | tail -14 | tee $OUT/engines_gpu.log
timeout 150 python3 -m bench.precision --json $OUT/precision_gpu.json --device cuda --data digits --seeds 0 --timing-variants float32,bf16 --timing-rounds 3 --timing-steps 10 2>&1 | grep -v "INFO\|WARNING" | tail -12 | tee $OUT/precision_gpu.log
