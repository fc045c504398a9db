#!/usr/bin/env bash
# Issue 16's check as a user runs it: a world of another seed and size, the product's defaults throughout, only the
# `ttd` command line. Prints the base model's and the TTD fine-tune's TagMask tables on the world's eval split.
#
#   experiments/as_a_user.sh OUT SEED TRAIN EVAL      # e.g. experiments/as_a_user.sh /tmp/user 7 1500 400
set -euo pipefail
OUT=${1:?OUT folder}; SEED=${2:?seed}; TRAIN=${3:?train images}; EVAL=${4:?eval images}
TTD=${TTD:-ttd}
$TTD synth "$OUT/synth" --train "$TRAIN" --eval "$EVAL" --seed "$SEED"
$TTD parse --corpus "$OUT/synth/train" --store "$OUT/store"
$TTD score --corpus "$OUT/synth/train" --store "$OUT/store" --workers 0
$TTD distill --corpus "$OUT/synth/train" --store "$OUT/store" --out "$OUT/ttd"
echo "== base model"
$TTD evaluate --dataset tagmask --root "$OUT/synth/eval" --store "$OUT/evalstore"
echo "== TTD (the product's defaults)"
$TTD evaluate --dataset tagmask --root "$OUT/synth/eval" --store "$OUT/evalstore" --lora "$OUT/ttd"
