#!/usr/bin/env bash
# One command for when a GPU is lent (the device tool: at most 15 min per task, 10 per command):
#
#   here, once:     bash benchmarks/gpu_check.sh --fetch-wheels      # the packages the device image lacks -> .whl/
#   on the device:  bash benchmarks/gpu_check.sh --out "$OUT"        # carry: [".whl"]; stops itself before 8 min
#   anywhere:       bash benchmarks/gpu_check.sh --dry-run --out DIR # the same stages on CPU with a tiny model
#
# Stages (each within what is left of the budget): the CUDA-marked tests; decode of a Llama-2-7B-shaped random model
# in bf16 / nf4 / nf4-dq / int8 / gptq.int4 with --compile and the share of the bandwidth roofline; QLoRA peak memory
# and step time (micro-batch 1, seq 512); GPTQ conversion of two 7B blocks, extrapolated to the whole model.
# Writes gpu_check.json, gpu_check.md and the logs to --out. Record the figures in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."

out="out/gpu_check"; dry=""; budget=470; fetch=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --dry-run) dry="--dry-run"; shift ;;
    --budget) budget="$2"; shift 2 ;;
    --fetch-wheels) fetch=1; shift ;;
    *) echo "error: unknown argument $1 (--out DIR, --dry-run, --budget SECONDS, --fetch-wheels)" >&2; exit 2 ;;
  esac
done

if [ -n "$fetch" ]; then  # runs here: wheels for the device's Python 3.12 (manylinux x86-64)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  plat=""; for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do plat="$plat --platform $p"; done
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl \
    bitsandbytes==0.50.2 jsonargparse==4.41.0 docstring-parser==0.17.0 typeshed-client==2.8.2 \
    importlib-resources==6.5.2
fi

start=$(date +%s)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "$dry" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tee "$out/env.txt"

# 1. the CUDA-marked tests (they skip on CPU), at most a quarter of the budget
tests_budget=$(( budget / 4 ))
timeout "$tests_budget" python3 -m pytest -q -m cuda -p no:cacheprovider -o addopts="" tests 2>&1 | tail -n 40 > "$out/cuda_tests.log"
echo "cuda tests: exit ${PIPESTATUS[0]} ($(tail -n 1 "$out/cuda_tests.log"))"

# 2-4. the measurements, within what is left
left=$(( budget - ($(date +%s) - start) ))
python3 benchmarks/gpu_check.py --out "$out" --seconds "$left" $dry
