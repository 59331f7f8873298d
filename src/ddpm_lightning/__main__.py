"""``python -m ddpm_lightning``: the ``ddpm`` command."""

from ddpm_lightning.cli import main

main()
