#!/usr/bin/env bash
# The kernels of this tree against those of an earlier commit, on one lent GPU, so that a
# speed-up is read on one machine (the lent kind may change between sessions). Before the
# call, here:  git archive COMMIT src | tar -x -C .baseline-src   (untracked: it travels
# with the tree; delete it afterwards). On the device, detached (one call may not be long
# enough):  (setsid bash benchmarks/device/kernels_ab.sh > /dev/null 2>&1 &)
# then wait for $W/done and copy $W into $OUT. Logs: tests.log, new.log, base.log (each ends
# with group_bench's table). NEW_SECTIONS / BASE_SECTIONS: group_bench's --only for each.
# TESTS / TESTS_LIMIT: the GPU test files and their time limit in seconds; NEW_LIMIT: the
# limit of this tree's group_bench (s). ITER_ARGS: when
# set, iter_bench.py runs last on this tree with these arguments (iter.log, iter.json).
set -u
export PYTHONPATH=src
W=${W:-/tmp/w}
mkdir -p "$W"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$W/gpu.txt"
timeout "${TESTS_LIMIT:-120}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_fast_gpu.py} \
  > "$W/tests.log" 2>&1
timeout "${NEW_LIMIT:-360}" python3 benchmarks/group_bench.py --only ${NEW_SECTIONS:-steps,select,switches,profile} \
  --profile-archs topk,isae,isae-iter,isae-iter+sg --out "$W/new.json" > "$W/new.log" 2>&1
PYTHONPATH=.baseline-src/src timeout 200 python3 benchmarks/group_bench.py \
  --only ${BASE_SECTIONS:-steps,select} --profile-archs topk,isae,isae-iter,isae-iter+sg \
  --out "$W/base.json" > "$W/base.log" 2>&1
if [ -n "${ITER_ARGS:-}" ]; then
  timeout "${ITER_LIMIT:-300}" python3 benchmarks/iter_bench.py $ITER_ARGS --out "$W/iter.json" \
    > "$W/iter.log" 2>&1
fi
echo done > "$W/done"
