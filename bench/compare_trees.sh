#!/usr/bin/env bash
# One device call: this working tree against an older commit, serving and training (bench/compare_trees.py).
# On the dev machine first, OLD the commit to compare with:
#   mkdir -p .old && git archive OLD | tar -x -C .old        (.old/ is in .git/info/exclude; carry it)
# then on the device: FASTCHAT_COMMIT=<sha> OLD_COMMIT=<sha> bash bench/compare_trees.sh [python args...]
# Both trees get the same _C, built once from this tree's csrc/ (the script refuses if the two differ).
set -euo pipefail
: "${FASTCHAT_COMMIT:?set it to this tree's commit}" "${OLD_COMMIT:?set it to the old tree's commit}"
export OUT="${OUT:-/tmp/out}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
diff -r csrc .old/csrc > /dev/null || { echo "csrc/ differs between the trees: build each tree's own _C"; exit 2; }
( time TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py -q build_ext --inplace ) > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
for tree in old new; do   # an import root laid out as setup.py installs the package
  src=$([ "$tree" = old ] && echo .old || echo .)
  root=/tmp/roots/$tree
  rm -rf "$root" && mkdir -p "$root"
  cp -r "$src/fastchat_core" "$root/"
  for sub in triton_kernels train serve bench; do cp -r "$src/$sub" "$root/fastchat_core/$sub"; done
  cp fastchat_core/_C*.so "$root/fastchat_core/"
done
cd /tmp   # not the checkout: python puts the working directory first on sys.path, ahead of PYTHONPATH
PYTHONPATH=/tmp/roots/new python3 -m fastchat_core.bench.compare_trees --old /tmp/roots/old --new /tmp/roots/new --old-commit "$OLD_COMMIT" \
  --new-commit "$FASTCHAT_COMMIT" --out "$OUT/refactor_check.json" "$@" 2>&1 | tee "$OUT/compare.log"
