#!/usr/bin/env bash
# The GPU measurement campaign, in phases that each fit one device call, run in the order given:
#   bash bench/run_gpu.sh setup,tests,kernels,train,decode,serving,server,pipeline
# "prebuilt" instead of "setup" installs around a carried fastchat_core/_C*.so without compiling.
# Narrower runs: TEST_ARGS (test files for "tests"), KERNELS_ARGS (e.g. "-k 'softcap or muon'"), SERVING_ARGS,
# TRAIN_ARGS (e.g. "--depths= --curve=.data/pretrain,.data/tokenizer.json"); they are split as a shell would.
# Every phase writes its full output under $OUT (JSON + logs); the tables print last.
# Set FASTCHAT_COMMIT to the commit computed on the dev machine, literally in the command: the device copy's
# .git is stale, so git there names an old commit.
# Before the first call, on the dev machine (both folders listed in .git/info/exclude, sent with `carry`):
#   .whl/  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#            liger-kernel uvicorn starlette h11 anyio sniffio click
#   .data/ pretrain/ with a few shards of $FASTCHAT_DATA/pretrain (real-text curve), tokenizer.json from
#          `fastchat tokenizer train --data .data/pretrain --vocab-size 65536 --out .data/tokenizer.json`,
#          and the _C*.so a "setup" phase returned (copy it to fastchat_core/ and use "prebuilt" next time)
set -uo pipefail
if [ -z "${FASTCHAT_COMMIT:-}" ]; then
  echo "set FASTCHAT_COMMIT to the commit, computed on the dev machine and written into the command:" \
       "every result file records it, and git on the device names a stale one"; exit 2
fi
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}" FASTCHAT_DATA="${FASTCHAT_DATA:-$PWD/.data}"
mkdir -p "$OUT"

# Carried wheels (liger-kernel, uvicorn, starlette...) go to a private site dir: nothing is downloaded.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

for phase in ${1//,/ }; do
  echo "=== $phase"
  case "$phase" in
    setup)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
      # A broken CUDA build must not hide everything else: fall back to the CPU-only extension and say so.
      ( time MAX_JOBS=16 python3 -m pip install -q -e . --no-build-isolation --no-deps ) > "$OUT/build.log" 2>&1 \
        || { echo "CUDA BUILD FAILED (see build.log); installing CPU-only extension"
             grep -m20 -B2 -A8 "error" "$OUT/build.log"
             FASTCHAT_NO_CUDA=1 python3 -m pip install -q -e . --no-build-isolation --no-deps; }
      tail -3 "$OUT/build.log"
      cp fastchat_core/_C*.so "$OUT/" 2>/dev/null ;;  # carry it back in later calls to skip the build
    prebuilt)
      FASTCHAT_NO_EXT=1 python3 -m pip install -q -e . --no-build-isolation --no-deps ;;
    tests)
      eval "args=(${TEST_ARGS:-tests})"
      python3 -m pytest -q -m gpu "${args[@]}" -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    kernels)
      eval "args=(${KERNELS_ARGS:-})"
      KERNELS_JSON="$OUT/kernels.json" KERNELS_PROFILE="$OUT" python3 -m pytest -q bench/bench_kernels.py -p no:cacheprovider "${args[@]}" \
        --benchmark-json="$OUT/kernels_raw.json" -s 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    train)
      eval "args=(${TRAIN_ARGS:-})"
      python3 -m fastchat_core.bench.bench_train --out "$OUT/train_d20.json" --profile-dir "$OUT" "${args[@]}" 2>&1 \
        | tee "$OUT/train.log" | tail -30 ;;
    decode)
      python3 -m fastchat_core.bench.bench_decode_attention --out "$OUT/decode_attention.json" 2>&1 \
        | tee "$OUT/decode.log" | tail -30 ;;
    serving)
      eval "args=(${SERVING_ARGS:-})"
      python3 -m fastchat_core.bench.bench_serving --out "$OUT/serving.json" --profile "$OUT/serving_profile.txt" \
        "${args[@]}" 2>&1 | tee "$OUT/serving.log" | tail -30 ;;
    server)
      python3 -m fastchat_core.bench.bench_server --out "$OUT/server.json" 2>&1 | tee "$OUT/server.log" | tail -30 ;;
    pipeline)
      # every stage of a one-GPU d12 on the carried .data; resumable: a second call on the same (warm)
      # machine continues at the first unfinished stage (markers in .home, kept between calls)
      # (PIPELINE_TIMEOUT stops it in time to still write a report of the stages that finished)
      FASTCHAT_HOME="$PWD/.home" timeout "${PIPELINE_TIMEOUT:-540}" python3 -m fastchat_core.cli speedrun --preset d12-1gpu \
        2>&1 | tee -a "$OUT/pipeline.log" | grep -E "^\[speedrun\]|summary|CORE|ChatCORE|val bpb|reward|Error|error" | tail -40
      [ -f "$PWD/.home/speedrun/d12-1gpu/report.done" ] || FASTCHAT_HOME="$PWD/.home" python3 -m fastchat_core.report 2>&1 | tail -5
      cp -r "$PWD/.home/report" "$OUT/" 2>/dev/null ;;
    *)
      echo "unknown phase: $phase"; exit 2 ;;
  esac
done
# At most 8 files come back from a device call: pack everything into one archive (a call killed at its
# time limit skips this and returns the loose files instead).
( cd "$OUT" && tar czf results.tgz --exclude=results.tgz -- * && find . -type f ! -name results.tgz -delete )
