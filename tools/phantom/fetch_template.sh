#!/usr/bin/env bash
# Fetch the MNI152 2009a (symmetric, 1 mm) T1 template and its GM/WM
# probability maps from the nilearn wheel (nilearn is NOT installed; the
# wheel is only unzipped).  Usage: tools/phantom/fetch_template.sh DIR
# Writes DIR/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz.
set -euo pipefail
DIR=${1:?usage: $0 DIR}
NILEARN_VERSION=0.14.1
PY=${PYTHON:-$(cd "$(dirname "$0")/../.." && pwd)/.venv-tools/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$DIR"
cd "$DIR"
WHL=nilearn-${NILEARN_VERSION}-py3-none-any.whl
[ -f "$WHL" ] || "$PY" -m pip download "nilearn==${NILEARN_VERSION}" --no-deps -d .
for t in t1 gm wm; do
  f=mni_icbm152_${t}_tal_nlin_sym_09a_converted.nii.gz
  "$PY" - "$WHL" "nilearn/datasets/data/$f" "$f" <<'PYEOF'
import sys, zipfile
whl, member, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z, open(out, "wb") as fh:
    fh.write(z.read(member))
PYEOF
  echo "wrote $DIR/$f"
done
