"""Write the boundary-case seeds (``docs/experiments/seeds_boundary_protocol.md``) from the four
writers' files: ``seeds_boundary/seeds.jsonl``. Run from the repository root with
ALIGNX_DATA_DIR set, after ``intent_set_7/build.py`` (the seeds must not near-duplicate it).

    python docs/experiments/seeds_boundary/build.py

A seed is dropped when it is an exact or near duplicate (cosine >= 0.9 on frozen
all-MiniLM-L6-v2) of any shipped seed or intent set, of the seventh set's prompts, of seed 0's
router data, or of an earlier seed (the intent sets' dedupe code).
"""
import importlib.util
import json
from pathlib import Path

from alignx.router.targets import read_intent_prompts

D = Path(__file__).resolve().parent
REFERENCE = ("intent_seeds.jsonl", "intent_seeds_2.jsonl", "intent_validation.jsonl",
             "intent_set.jsonl", "intent_set_2.jsonl", "intent_set_3.jsonl", "intent_set_4.jsonl",
             "intent_set_5.jsonl", "intent_set_6.jsonl")
spec = importlib.util.spec_from_file_location("seeds2_build", D.parent / "intent_seeds_2" / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)

if __name__ == "__main__":
    rows = [r for w in range(1, 5)
            for r in build.read_writer(D / f"writer_{w}.jsonl", {"writer": w})]
    print("written", len(rows))
    ref = [p for name in REFERENCE for p in read_intent_prompts(name=name)[0]]
    set7 = [json.loads(line)["prompt"] for line in open(D.parent / "intent_set_7" / "merged.jsonl")]
    final, _ = build.dedupe(rows, ref + set7 + build.router_data())
    with open(D / "seeds.jsonl", "w", encoding="utf-8") as f:
        for r in final:
            f.write(json.dumps({"prompt": r["prompt"], "axis": r["writer_axis"],
                                "note": r["note"], "writer": r["writer"]},
                               ensure_ascii=False) + "\n")
    print("kept", len(final), "->", D / "seeds.jsonl")
