"""The names a command line offers (samplers, spacings, schedules, ...), as plain tuples with no torch import.

Command parsers take their choices from here so that ``--help`` answers without importing torch;
``tests/test_choices.py`` checks these names against the library's own.
"""

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "heun")
SPACINGS = ("uniform", "quadratic", "karras")
SCHEDULES = ("linear", "cosine")
VARIANCES = ("fixed_large", "fixed_small", "learned_range", "learned")
METRICS = ("fid", "isc", "kid")
EVAL_DATASETS = ("cifar10", "digits")
PAPER_NUM_SAMPLES = 50_000
