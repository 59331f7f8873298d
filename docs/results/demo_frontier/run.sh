#!/bin/bash
# new-recipe frontier: one 2400-step run of configs/demo.yaml, checkpoints every 40 steps, then each N in
# 400..2400 scored like the report (250 samples, dpmpp_2m 20), autoguided by the EMA at 0.3 N (w 2) and unguided
set -e
R=runs/frontier   # from the repository root
mkdir -p $R
export OMP_NUM_THREADS=${THREADS:-1}
if [ ! -f $R/checkpoints/step=2400.ckpt ]; then
ddpm fit -c configs/demo.yaml --trainer.max_steps=2400 --trainer.default_root_dir=$R \
  --trainer.enable_progress_bar=false \
  --trainer.callbacks+=ModelCheckpoint --trainer.callbacks.every_n_train_steps=40 \
  --trainer.callbacks.save_top_k=-1 --trainer.callbacks.filename='{step}' > $R/fit.log 2>&1
fi
C=$R/checkpoints
for N in 400 800 1200 1600 2000 2400; do
  G=$((N * 3 / 10))
  ddpm sampler-sweep --ckpt $C/step=$N.ckpt --samplers dpmpp_2m --steps 20 \
     --guide-ckpt $C/step=$G.ckpt --autoguidance-scale 2 --out $R/ag_$N > $R/ag_$N.log 2>&1
done
ddpm sampler-sweep --ckpt $(for N in 400 800 1200 1600 2000 2400; do echo $C/step=$N.ckpt; done) \
   --labels s400 s800 s1200 s1600 s2000 s2400 --samplers dpmpp_2m --steps 20 --out $R/unguided > $R/unguided.log 2>&1
echo done > $R/DONE
