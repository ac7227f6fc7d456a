#!/bin/bash
# docs/experiments/wise_2_protocol.md: the four runs of this round, in order.
set -u
cd "$(dirname "$0")/../../.."
export ALIGNX_DATA_DIR=${ALIGNX_DATA_DIR:-../shared/data}
E='router.evaluation_sets=[intent_validation.jsonl,intent_set.jsonl,intent_set_5.jsonl,intent_set_6.jsonl,intent_set_7.jsonl,intent_set_8.jsonl,intent_set_9.jsonl,intent_set_10.jsonl,intent_set_11.jsonl]'
S='router.seed_sets=[intent_seeds.jsonl,intent_seeds_2.jsonl,intent_set_2.jsonl,intent_seeds_3.jsonl,/tmp/seeds_sets/sets_5_8.jsonl]'
for arm in "25 0.25" "38 0.375"; do
  set -- $arm
  for s in 0 1; do
    r=/tmp/runs/w$1_$s
    python docs/experiments/wise/dump_wise.py "$r" "$r.pkl" /tmp/runs/x$s /tmp/runs/f$s "$2" \
      seed=$s "$S" "$E" > "$r.log" 2>&1
    echo "w$1_$s rc=$? $(date)" >> /tmp/runs/queue.log
  done
done
