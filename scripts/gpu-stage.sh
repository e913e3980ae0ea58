#!/usr/bin/env bash
# Builds the CUDA test and bench binaries here (no GPU needed) and copies them under
# .gpu-carry/bin with stable names, for scripts/gpu-check.sh to run on a GPU machine:
#
#   scripts/gpu-stage.sh            # here
#   bash scripts/gpu-check.sh       # there, with .gpu-carry carried along
#
# Both machines must be x86-64 Linux; the binaries load libcuda and libnvrtc at run time.
set -euo pipefail

cd "$(dirname "$0")/.."
CARRY=.gpu-carry
rm -rf "$CARRY"
mkdir -p "$CARRY/bin"

# Test binaries: every integration test (the CUDA ones skip nothing under DPO_REQUIRE_GPU).
cargo test --offline --release --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    target = msg["target"]
    # cli runs the dpo-kernels binary by the path it was built at, which the GPU machine
    # does not have; it exercises nothing of the CUDA backend.
    if "test" in target["kind"] and target["name"] != "cli":
        print(target["name"], msg["executable"])
' | while read -r name executable; do
    cp "$executable" "$CARRY/bin/test-$name"
done

cargo build --offline --release --bench dpo_cuda --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and msg["target"]["name"] == "dpo_cuda":
        print(msg["executable"])
' | while read -r executable; do
    cp "$executable" "$CARRY/bin/bench-dpo_cuda"
done

ls -l "$CARRY/bin"
du -sh "$CARRY"
