#!/usr/bin/env bash
# Times the CPU backend (criterion, benches/dpo.rs) and Hugging Face TRL on PyTorch
# (scripts/trl_peer.py) at the same shape in one run, and prints the medians and their ratio.
# Usage: scripts/peer-bench.sh   (creates the peer's Python environment on first use)
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(scripts/peer-env.sh)
threads=$(nproc)

cargo bench --bench dpo -- --warm-up-time 2 --measurement-time 8 "dpo/(bf16|f32)/4x512x32000"
for dtype in bf16 f32; do
    RAYON_NUM_THREADS=$threads "$python" scripts/trl_peer.py time --dtype "$dtype" \
        --threads "$threads" --repeats 7 > "target/trl-peer-$dtype.json"
done

python3 - "$threads" <<'PY'
import glob, json, sys
threads = sys.argv[1]
print(f"\nmedian ms, 4 pairs x 512 positions x V=32000, half masked, {threads} threads")
print(f"{'dtype':6} {'pass':18} {'dpo-kernels':>12} {'TRL':>10} {'TRL / ours':>11}")
for dtype in ["bf16", "f32"]:
    peer = json.load(open(f"target/trl-peer-{dtype}.json"))
    for ours_id, peer_key in [("cpu_forward", "forward_ms"), ("cpu_forward_backward", "forward_backward_ms")]:
        path = glob.glob(f"target/criterion/dpo_{dtype}_4x512x32000/{ours_id}/new/estimates.json")[0]
        ours = json.load(open(path))["median"]["point_estimate"] / 1e6
        theirs = peer[peer_key]
        print(f"{dtype:6} {ours_id[4:]:18} {ours:12.1f} {theirs:10.1f} {theirs / ours:10.2f}x")
PY
