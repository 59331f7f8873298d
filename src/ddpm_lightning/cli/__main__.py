"""``python -m ddpm_lightning.cli``: the ``ddpm`` command."""

from ddpm_lightning.cli import main

main()
