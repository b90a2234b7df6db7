#!/usr/bin/env bash
# The documentation site builds with no warning: installs MkDocs and the Material theme
# (docs/requirements.txt) into the current environment, which must already have ue_fast
# installed (the CLI reference page is generated from ue_fast.cli.build_parser() at build
# time), then runs `mkdocs build --strict`, which fails on a broken link or anchor, a page
# left out of mkdocs.yml's nav, or a usage marker naming no subcommand.
set -euo pipefail
cd "$(dirname "$0")/.."

python -c "import ue_fast.cli" || {
    echo "docs_check: ue_fast is not importable here; install the project first (see README.md)" >&2
    exit 1
}
python -m pip install --quiet -r docs/requirements.txt
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --site-dir "$site"
echo "== docs built: $(find "$site" -name index.html | wc -l) pages"
