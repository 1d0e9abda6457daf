#!/usr/bin/env sh
# Snakemake (`--sdm conda`) runs this once inside the environment it has just built from
# environment.yml, from the directory snakemake runs in (the script itself is copied under
# .snakemake/conda/ first, so it cannot find the checkout by its own location). It installs the
# rapm checkout there, editable, with the dependencies pyproject.toml lists.
set -eu
if ! grep -qs '^name = "rapm"$' pyproject.toml; then
    echo "environment.post-deploy.sh: $(pwd) is not a rapm checkout (no pyproject.toml of rapm);" \
        "run 'snakemake --sdm conda' from the rapm checkout" >&2
    exit 1
fi
python -m pip install --no-build-isolation -e .
