#!/bin/bash
# seeds_9_11_protocol.md: Y, seed 0 then seed 1 (about 50 min each alone on 2 cores).
cd "$(dirname "$0")/../../.."
mkdir -p /tmp/seeds_sets /tmp/runs
cat alignx/router/intent_set_9.jsonl alignx/router/intent_set_10.jsonl \
    alignx/router/intent_set_11.jsonl > /tmp/seeds_sets/sets_9_11.jsonl
S='router.seed_sets=[intent_seeds.jsonl,intent_seeds_2.jsonl,intent_set_2.jsonl,intent_seeds_3.jsonl,intent_set_5.jsonl,intent_set_6.jsonl,intent_set_7.jsonl,intent_set_8.jsonl,/tmp/seeds_sets/sets_9_11.jsonl]'
E='router.evaluation_sets=[intent_validation.jsonl,intent_set.jsonl,intent_set_12.jsonl]'
export ALIGNX_DATA_DIR=${ALIGNX_DATA_DIR:-../shared/data}
for s in 0 1; do
  .venv/bin/python docs/experiments/dump_calibration.py /tmp/runs/y$s /tmp/runs/y$s.pkl \
      seed=$s "$S" "$E" > /tmp/runs/y$s.log 2>&1
  echo "y$s rc=$? $(date)" >> /tmp/runs/queue.log
done
