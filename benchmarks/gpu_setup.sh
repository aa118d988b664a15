#!/usr/bin/env bash
# Source on the GPU machine (device tool). The carried wheels (.whl, from ../shared/tools/gpu-wheels.sh plus gguf)
# and the SmolLM2 GGUF in parts (.gguf/{a,b,c}/part_*, made with `split -b 34M`) are copied, call by call while the
# machine is warm, into /tmp/c (a carried path does not survive the next call). This installs the wheels, joins
# and converts the GGUF to .cache/models/SmolLM2-135M-Instruct, and exports PYTHONPATH for `align`.
set -e
C=${CARRY_DIR:-/tmp/c}
[ -d .whl ] && mkdir -p $C && cp -r .whl $C/ 2>/dev/null || true
[ -d .gguf ] && mkdir -p $C && cp -r .gguf $C/ 2>/dev/null || true
[ -f /tmp/site/.installed ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $C/.whl/*.whl
touch /tmp/site/.installed
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# the model only once all three parts have arrived (the first calls can run the random-weight benchmarks)
if [ ! -f .cache/models/SmolLM2-135M-Instruct/model.safetensors ] && [ -d $C/.gguf/c ]; then
  cat $C/.gguf/a/part_* $C/.gguf/b/part_* $C/.gguf/c/part_* > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -c "from align.convert import convert_gguf; convert_gguf('/tmp/SmolLM2-135M-Instruct.Q4_1.gguf', '.cache/models/SmolLM2-135M-Instruct')"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
