#!/usr/bin/env bash
# The pruning sweep of docs/compression.md, for one training seed (run from the repository root):
#
#     bash report/pruning/run_sweep.sh 0        # then 1 and 2: the seeds are paired across rows
#
# On generated data shaped like the demo's students' (data/pdemo, made once, seed 0):
#   1. the unpruned student: 20 epochs of plain cross-entropy (lr 1e-2), its final checkpoint;
#   2. the control: the same student trained 20 more epochs by the fine-tuning recipe below,
#      itself as teacher, so that "pruned + fine-tuned" is compared with as many epochs unpruned;
#   3. for each sparsity: compress.py's structural pruning, scored as it is ("before"), then
#      fine-tuned by distillation with the unpruned student as teacher ("after"): alpha 0.5,
#      tau 1, 20 epochs at lr 5e-3, the setting chosen on `select` at sparsity 0.5, seed 0
#      (report/pruning/finetune/, docs/compression.md).
# Every checkpoint is scored on `select` and `val` (evaluate.py) into report/pruning/sweep/;
# `python plots.py compression ...` and the docs read those files. A step whose result file
# exists is skipped, so an interrupted sweep continues where it stopped.
# About 40 min per seed on one core of a 2-core AMD EPYC.
set -euo pipefail
S=${1:?usage: bash report/pruning/run_sweep.sh SEED}
PY=${PYTHON:-python}
OUT=report/pruning/sweep
mkdir -p "$OUT"
[ -d data/pdemo/VOCdevkit ] || \
    $PY synth.py --root data/pdemo --train 160 --val 300 --select 150 --size 96 --classes 4 --seed 0
D=(--data-root data/pdemo --batch-size 8 --crop-size 96 --scale-range 0.75 1.5
   --no-pretrained-backbone --no-download --val-split select --val-every 5 --no-progress
   --threads 1 --seed "$S")
FT=(--alpha 0.5 --tau 1 --epochs 20 --lr 5e-3)
BASE=pbase_s$S

score() {  # score NAME CHECKPOINT: select and val
    for split in select val; do
        [ -f "$OUT/$1_$split.json" ] || $PY evaluate.py --model_path "$2" --data-root data/pdemo \
            --no-download --split $split --threads 1 --no-progress --json "$OUT/$1_$split.json"
    done
}

train() {  # train NAME FLAGS...: a train_kd.py run, its summary kept beside the scores
    local name=$1; shift
    [ -f "$OUT/${name}_summary.json" ] || {
        $PY train_kd.py --out "$name" "${D[@]}" "$@" --overwrite
        cp "outputs/$name/summary.json" "$OUT/${name}_summary.json"
    }
    score "$name" "models/${name}_last.pth"
}

train "$BASE" --epochs 20 --lr 1e-2
train "${BASE}_cont" --init-from "models/${BASE}_last.pth" --teacher lite \
    --teacher-weights "models/${BASE}_last.pth" "${FT[@]}"
for sp in 0.25 0.5 0.75; do
    pruned=models/compressed/${BASE}_last_pruned_channels_$sp.pth
    [ -f "$OUT/${BASE}_compress_$sp.json" ] && [ -f "$pruned" ] || \
        $PY compress.py --model_path "models/${BASE}_last.pth" --data-root data/pdemo --no-download \
            --skip int8 onnx --sparsity $sp --runs 3 --warmup 1 --threads 1 --no-progress \
            --json "$OUT/${BASE}_compress_$sp.json"
    score "${BASE}_p${sp}" "$pruned"
    train "${BASE}_p${sp}_ft" --init-from "$pruned" --teacher lite \
        --teacher-weights "models/${BASE}_last.pth" "${FT[@]}"
done
echo "sweep of seed $S complete: $OUT"
