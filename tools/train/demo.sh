#!/usr/bin/env bash
# The demo model's recipe, from nothing: template -> phantom train and test sets ->
# both networks -> fcd eval of the method, its ablations and the naive baseline
# (weights/README.md, the model card, has the results; tools/train/README.md the history).
#
#     python3 -m venv .venv-tools && .venv-tools/bin/pip install -r tools/requirements.txt
#     cargo build --release
#     bash tools/train/demo.sh [WORK]            # WORK defaults to .phantom/
#
# Stages are skipped when their output exists, so an interrupted run resumes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
work="${1:-.phantom}"
py=.venv-tools/bin/python
fcd=target/release/fcd
config=weights/config.yaml
mkdir -p "$work"

if [ ! -e "$work/mni/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz" ]; then
    bash tools/phantom/fetch_template.sh "$work/mni"
fi
m="$work/mni/mni_icbm152"
tissue=(--t1 "${m}_t1_tal_nlin_sym_09a_converted.nii.gz"
    --gm "${m}_gm_tal_nlin_sym_09a_converted.nii.gz"
    --wm "${m}_wm_tal_nlin_sym_09a_converted.nii.gz")
phantom() { # OUT SEED FIRST_ID SUBJECTS LESION_FRACTION Z_STEP [--png]
    [ -d "$1" ] || $py tools/phantom/make.py "${tissue[@]}" --out "$1" --seed "$2" \
        --first-id "$3" --subjects "$4" --lesion-fraction "$5" --z-range 60:130 \
        --z-step "$6" "${@:7}"
}
# Training subjects (with lesion-free twins for the classifier): seeds 3, 4 and 6,
# numbered from 101, 201 and 301. Held-out subjects scored during training: seed 5, from 501.
# Test subjects: seed 2, from 1001. The shipped subject weights/phantom/sub-001: seed 7.
phantom "$work/train1" 3 101 60 0.9 3 --twins
phantom "$work/train2" 4 201 60 0.9 3 --twins
phantom "$work/train3" 6 301 60 0.9 3 --twins
phantom "$work/val" 5 501 12 0.5 2
phantom "$work/test" 2 1001 8 0.5 2 --png
[ -d "$work/test_pick" ] || $py tools/phantom/pick_slices.py "$work/test/png" \
    "$work/test_pick" --lesion-slices 3 --healthy-slices 1

mkdir -p "$work/weights"
# The two networks train at once, one thread each (2 cores); logs beside the weights.
train() { [ -e "$1" ] || $py tools/train/train.py "${@:2}" --out "$1" > "${1%.pt}.log" 2>&1; }
train "$work/weights/unet.pt" --net unet --config "$config" \
    --data "$work/train1" "$work/train2" --val "$work/val" --val-every 300 --steps 900 --seed 1 &
unet=$!
train "$work/weights/classifier.pt" --net classifier --config "$config" \
    --data "$work/train1" "$work/train2" "$work/train3" --val "$work/val" --steps 2000 \
    --lr 5e-4 --seed 2 &
wait "$unet"
wait $!

# R@k's radius is 3 px of the 64 x 64 grid: about 10 mm, the paper's 10 px at
# 256 x 256 over 240 mm.
common=(--config "$config" --unet "$work/weights/unet.pt"
    --classifier "$work/weights/classifier.pt" --data "$work/test_pick" --radius 3 --device cpu)
$fcd eval "${common[@]}" --out "$work/eval/method"
$fcd eval "${common[@]}" --no-hist-match --out "$work/eval/no_hist_match"
$fcd eval "${common[@]}" --guidance 0 --out "$work/eval/guidance_0"
$fcd eval "${common[@]}" --anomaly-map flair --out "$work/eval/flair_baseline"
$py - "$work/eval" <<'EOF'
import json, pathlib, sys
print("| anomaly map | R@1 | R@5 | R@10 | Dice@0.4 | best Dice |\n|---|---|---|---|---|---|")
for run in ["method", "no_hist_match", "guidance_0", "flair_baseline"]:
    m = json.loads((pathlib.Path(sys.argv[1]) / run / "metrics.json").read_text())
    cells = [m["r_at_1"], m["r_at_5"], m["r_at_10"], m["dice_at_threshold"], m["dice_best"]]
    print(f"| {run} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
EOF
