#!/usr/bin/env bash
# Builds the GPU check bundle (docs/benchmarks.md, "GPU"): what a lent GPU machine without network needs
# to run scripts/gpu_check.sh and scripts/vjp_floor.py. Its python3 has torch with CUDA but no Ray, so:
#   OUT_DIR/ray.tar.xz  Ray $RAY_VERSION's cp312 manylinux x86-64 wheel, unpacked and trimmed (no ray/jars,
#                       rllib, serve, llm, data/llm.py, train, tune or dashboard/client/build; the serve
#                       and tune entry points dropped; shared objects, raylet and gcs_server stripped when
#                       `strip` exists; RECORD rebuilt), packed with xz -9 (about 17 MB);
#   OUT_DIR/wheels/     jsonschema and its three needs (`import ray` fails without it), cp312 wheels;
#   OUT_DIR/shared/     the models and the first 2,000 rows of the cifar10, mnist and textures32 test
#                       sets of $SHARED (what bench's precision table and vjp_floor.py read);
#   OUT_DIR/run.sh      unpacks all that into /tmp/site on the GPU machine and runs the two checks.
# Usage: scripts/gpu_bundle.sh [OUT_DIR]   (default .gpu; SHARED=../shared RAY_VERSION=2.60.0
#        PY=.venv/bin/python or python3 (pip and pyarrow) WHEELS="jsonschema==... ..." override)
# Needs PyPI (pip download), unzip, xz and a Python with pip and pyarrow. Works in a temporary folder and
# replaces OUT_DIR at the end. run.sh expects the bundle at .gpu in the repository root: on the device,
# carry .gpu and run `bash .gpu/run.sh` (with $OUT set).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-.gpu}
SHARED=${SHARED:-../shared}
RAY_VERSION=${RAY_VERSION:-2.60.0}
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
case $PY in */*) PY=$(realpath -s "$PY") ;; esac  # the RECORD step runs in another folder
WHEELS=${WHEELS:-jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1}
TRIM=(ray/jars ray/rllib ray/serve ray/llm ray/data/llm.py ray/train ray/tune ray/dashboard/client/build)
ROWS=2000

"$PY" -c "import pyarrow" || { echo "gpu_bundle: $PY cannot import pyarrow (set PY)" >&2; exit 1; }
"$PY" -m pip --version > /dev/null || { echo "gpu_bundle: $PY has no pip (set PY)" >&2; exit 1; }
for tool in unzip xz tar; do
    command -v "$tool" > /dev/null || { echo "gpu_bundle: $tool is missing" >&2; exit 1; }
done
[ -d "$SHARED/datasets" ] && [ -d "$SHARED/models" ] || { echo "gpu_bundle: no datasets/ and models/ in $SHARED" >&2; exit 1; }
if [ -e "$OUT_DIR" ] && [ -n "$(ls -A "$OUT_DIR")" ] && ! [ -f "$OUT_DIR/run.sh" ] && ! [ -f "$OUT_DIR/ray.tar.xz" ]; then
    echo "gpu_bundle: $OUT_DIR exists and is not a bundle; not replacing it" >&2
    exit 1
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
B=$TMP/bundle
mkdir -p "$B/wheels" "$TMP/dl" "$TMP/ray"
PIP_DL=(download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
        --disable-pip-version-check -q)

echo "== download ray==$RAY_VERSION and $WHEELS"
"$PY" -m pip "${PIP_DL[@]}" -d "$TMP/dl" "ray==$RAY_VERSION"
# shellcheck disable=SC2086  # WHEELS is a list of requirements
"$PY" -m pip "${PIP_DL[@]}" -d "$B/wheels" $WHEELS
whl=$(ls "$TMP/dl"/ray-"$RAY_VERSION"-*.whl)

echo "== unpack and trim $(basename "$whl")"
unzip -q "$whl" -d "$TMP/ray"
cd "$TMP/ray"
DIST=ray-$RAY_VERSION.dist-info
rm -rf "${TRIM[@]}"
sed -i -E '/^(serve|tune) = /d' "$DIST/entry_points.txt"
if command -v strip > /dev/null; then
    find ray -type f \( -name '*.so' -o -name '*.so.*' \) -exec strip {} +
    strip ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server
else
    echo "gpu_bundle: no strip here, the binaries stay as they are (the archive is larger)" >&2
fi
# RECORD: the wheel's entries for the files left, in its order, with their new hashes and sizes.
"$PY" - "$DIST/RECORD" << 'EOF'
import base64, csv, hashlib, os, sys

path = sys.argv[1]
with open(path, newline="") as f:
    rows = [r for r in csv.reader(f) if r]
with open(path, "w", newline="") as f:
    out = csv.writer(f, lineterminator="\n")
    for name, *_ in rows:
        if name == path:
            out.writerow([name, "", ""])
        elif os.path.isfile(name):
            data = open(name, "rb").read()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            out.writerow([name, "sha256=" + digest, len(data)])
EOF
echo "== pack ray.tar.xz (xz -9, a minute or two)"
tar --sort=name --owner=root:0 --group=root:0 -cf - ray "$DIST" | xz -9 > "$B/ray.tar.xz"
cd - > /dev/null

echo "== shared subsets of $SHARED (first $ROWS rows)"
"$PY" - "$SHARED" "$B/shared" "$ROWS" << 'EOF'
import os, shutil, sys

import pyarrow.parquet as pq

src, dst, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])


def target(rel):
    os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
    return os.path.join(dst, rel)


def copy(rel):
    shutil.copyfile(os.path.join(src, rel), target(rel))


copy("datasets/README.md")
for name in ("cifar10", "mnist", "textures32"):
    copy(f"datasets/{name}/dataset_info.json")
    rel = f"datasets/{name}/test/part-00000.parquet"
    if pq.ParquetFile(os.path.join(src, rel)).metadata.num_rows <= rows:
        copy(rel)  # all of it: the file as it is
    else:
        pq.write_table(pq.read_table(os.path.join(src, rel)).slice(0, rows), target(rel), compression="zstd")
for name in sorted(os.listdir(os.path.join(src, "models/cifar10-resnet"))):
    copy(f"models/cifar10-resnet/{name}")
EOF

cat > "$B/run.sh" << 'RUNSH'
#!/usr/bin/env bash
# GPU check bundle (not tracked: .gitignore names /.gpu/). On the GPU machine, from the repo root,
# with $OUT set:   bash .gpu/run.sh
#   1. unpacks the trimmed Ray 2.60.0 (cp312, manylinux x86-64) into /tmp/site and installs the
#      wheels in .gpu/wheels (jsonschema and its needs: `import ray` fails without it) there too;
#   2. checks that python3 imports ray and ray.data from /tmp/site;
#   3. runs scripts/gpu_check.sh on .gpu/shared (a 2,000-row subset of the shared sets bench reads),
#      its logs in $OUT/gpu, under a limit of 400 s;
#   4. runs scripts/vjp_floor.py --device cuda --batch 4096 (110 s at most), its log in $OUT/gpu too.
# Each output line of step 3 is prefixed with the seconds since this script started; each step
# ends with a "== [run.sh] ...: Ns" line. Nothing else is copied to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
B=.gpu
SITE=/tmp/site
T0=$SECONDS
t=$SECONDS
step() { printf '== [run.sh] %s: %ds (total %ds)\n' "$1" $((SECONDS - t)) $((SECONDS - T0)); t=$SECONDS; }
stamp() { while IFS= read -r line; do printf '[%4ds] %s\n' $((SECONDS - T0)) "$line"; done; }

rm -rf "$SITE" && mkdir -p "$SITE"
tar -xJf "$B/ray.tar.xz" -C "$SITE" || { echo "run.sh: cannot unpack $B/ray.tar.xz" >&2; exit 1; }
step "unpack ray.tar.xz into $SITE"

if compgen -G "$B/wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "$B"/wheels/*.whl || { echo "run.sh: pip install of $B/wheels failed" >&2; exit 1; }
fi
step "pip install $B/wheels/*.whl into $SITE"

export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
python3 -c "import ray, ray.data; print(ray.__version__)" \
    || echo "run.sh: python3 cannot import ray from $SITE (gpu_check.sh will skip its job step)" >&2
step "import ray, ray.data"

mkdir -p "$OUT/gpu"
SHARED=$B/shared ROWS=200000 JOB_TIMEOUT=300 timeout -k 15 400 scripts/gpu_check.sh "$OUT/gpu" 2>&1 | stamp
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "run.sh: scripts/gpu_check.sh stopped at its 400 s limit" >&2
step "scripts/gpu_check.sh (exit $rc)"
timeout -k 10 110 python3 scripts/vjp_floor.py --device cuda --batch 4096 --shared "$B/shared" 2>&1 | tee "$OUT/gpu/vjp_floor.log" | stamp
step "scripts/vjp_floor.py --device cuda --batch 4096"
exit "$rc"
RUNSH
chmod 755 "$B/run.sh"

rm -rf "$OUT_DIR"
mkdir -p "$(dirname "$OUT_DIR")"
mv "$B" "$OUT_DIR"
echo "== bundle in $OUT_DIR: $(du -sh "$OUT_DIR" | cut -f1) ($(du -sb "$OUT_DIR" | cut -f1) bytes; a device run carries at most 64 MiB)"
find "$OUT_DIR" -type f | sort | sed 's/^/   /'
echo "To use it: the device run carries $OUT_DIR (carry: [\"$OUT_DIR\"]) and runs \`bash $OUT_DIR/run.sh\`, with \$OUT set;"
echo "its logs come back in \$OUT/gpu. run.sh reads the bundle at .gpu in the repository root, so it must be there."
if [ "$OUT_DIR" != .gpu ] && [ "$OUT_DIR" != .gpu/ ]; then
    echo "gpu_bundle: note: $OUT_DIR is not .gpu; move it to .gpu before the device run" >&2
fi
ignored=0
git check-ignore -q "$OUT_DIR" 2> /dev/null || ignored=$?
if [ "$ignored" = 1 ]; then
    echo "gpu_bundle: note: $OUT_DIR is not git-ignored (add /${OUT_DIR%/}/ to .gitignore or .git/info/exclude to keep it out of git)" >&2
fi
