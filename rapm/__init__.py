"""rapm: single-GPU diffusion distillation (RAPM, MSD) as an importable package.

The Snakemake workflow in this repository calls the command-line interface
(``python -m rapm <stage> ...``); every stage also works without Snakemake.
"""

__version__ = "0.1.0"
