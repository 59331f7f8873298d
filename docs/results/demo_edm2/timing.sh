#!/bin/bash
# Steps/s of each candidate's training step, side by side in one run, on the emulated reference CPU (2 threads,
# AVX2): python docs/results/demo_edm2/timing.py reads the budget.json files. From the repository root:
#   bash docs/results/demo_edm2/timing.sh runs/timing
set -e
OUT=${1:-runs/timing}
D=docs/results/demo_edm2
mkdir -p $OUT
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=2
for round in 1 2; do
  for name in base mp learned immiscible full_guide; do
    case $name in
      base) extra=();;
      mp) extra=(-c $D/mp_lr1e-2_learned.yaml);;
      learned) extra=(-c $D/learned.yaml);;
      immiscible) extra=(-c $D/immiscible.yaml);;
      full_guide) extra=(-c $D/mp_learned_isqrt.yaml --trainer.callbacks+=ddpm_lightning.callbacks.GuideTraining
                         --trainer.callbacks.init_args.fraction=1.0);;
    esac
    ${DDPM:-.venv/bin/ddpm} fit -c configs/demo.yaml "${extra[@]:0:2}" -c $D/timing_only.yaml "${extra[@]:2}" \
      --trainer.default_root_dir=$OUT/${name}_$round > $OUT/${name}_$round.log 2>&1 || echo "$name failed"
  done
done
