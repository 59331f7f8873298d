"""Evaluation as library functions, for Python and notebooks (``ddpm evaluate``, ``ddpm sampler-sweep``,
``ddpm guidance-sweep``, ``ddpm nll`` and ``ddpm ablate --collect`` are thin shells over them). Each job takes a
spec, a frozen dataclass of what to sample or read, how many, and where to write, checked when it is made; the
command builds the same spec from its options.

- :func:`bpd_of_images`: the NLL bound in bits/dim of a model on images; ``ddpm_lightning.evaluation.nll.nll``
  (:class:`NLLSpec`; the module's function, not exported here so that the module keeps its name) is ``ddpm nll``.
- :func:`evaluate` (:class:`EvaluateSpec`): FID / IS / KID (torch-fidelity) of a checkpoint's samples or a PNG folder;
  :func:`fid_of_images`.
- :func:`sweep` (:class:`SweepSpec`): sample quality and speed of each sampler setting against the number of network
  evaluations.
- :func:`guidance_sweep` (:class:`GuidanceSweepSpec`): a class-conditional digits model's accuracy of the requested
  class at each guidance scale.
- :func:`collect` (:class:`CollectSpec`), :func:`load_runs`: the ablation's table and curves.
- :class:`DigitScorer`: the demo's digit-classifier figures; the offline FID Inception weights (``inception_weights``).

``evaluate`` and ``sweep`` are the functions; their modules are named otherwise (``ddpm_lightning.evaluation.fidelity``
and ``ddpm_lightning.evaluation.sampler_sweep``) so that neither function hides a module.
"""

from ddpm_lightning.evaluation.ablation import CollectSpec, collect, load_runs, read_metrics, run_dir
from ddpm_lightning.evaluation.digit_classifier import DigitClassifier, DigitScorer, frechet_distance, score_digits
from ddpm_lightning.evaluation.fidelity import METRICS, PAPER_NUM_SAMPLES, EvaluateSpec, evaluate, fid_of_images
from ddpm_lightning.evaluation.guidance import GuidanceSweepSpec, guidance_sweep
from ddpm_lightning.evaluation.inception_weights import (
    FID_WEIGHTS_FILENAME,
    build_fid_extractor,
    check_fid_weights,
    find_cached_weights,
    missing_weights_message,
    prepare_fid_weights,
    resolve_fid_weights,
)
from ddpm_lightning.evaluation.nll import NLLSpec, bpd_of_images
from ddpm_lightning.evaluation.sampler_sweep import SETTINGS, STEPS, SweepSpec, sweep

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "METRICS",
    "PAPER_NUM_SAMPLES",
    "SETTINGS",
    "STEPS",
    "CollectSpec",
    "DigitClassifier",
    "DigitScorer",
    "EvaluateSpec",
    "GuidanceSweepSpec",
    "NLLSpec",
    "SweepSpec",
    "bpd_of_images",
    "build_fid_extractor",
    "check_fid_weights",
    "collect",
    "evaluate",
    "fid_of_images",
    "find_cached_weights",
    "frechet_distance",
    "guidance_sweep",
    "load_runs",
    "missing_weights_message",
    "prepare_fid_weights",
    "read_metrics",
    "resolve_fid_weights",
    "run_dir",
    "score_digits",
    "sweep",
]
