"""Write the boundary-case seeds (``docs/experiments/seeds_boundary_protocol.md``) from the four
writers' files: ``seeds_boundary/seeds.jsonl``. Run from the repository root with
ALIGNX_DATA_DIR set, after ``intent_set_7/build.py`` (the seeds must not near-duplicate it).

    python docs/experiments/seeds_boundary/build.py

A seed is dropped when it is an exact or near duplicate (cosine >= 0.9 on frozen
all-MiniLM-L6-v2) of any shipped seed or intent set, of the seventh set's prompts, of seed 0's
router data, or of an earlier seed (the intent sets' dedupe code). :func:`build_seeds` is shared
with ``seeds_boundary_2/build.py``.
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


def build_seeds(d: Path, writers: range, reference: tuple[str, ...], merged: Path) -> None:
    """Read ``d/writer_<w>.jsonl`` for each writer, drop duplicates of the ``reference`` files,
    of ``merged`` (a frozen set's prompts before it ships) and of seed 0's router data, and
    write ``d/seeds.jsonl``."""
    rows = [r for w in writers for r in build.read_writer(d / f"writer_{w}.jsonl", {"writer": w})]
    print("written", len(rows))
    ref = [p for name in reference for p in read_intent_prompts(name=name)[0]]
    held = [json.loads(line)["prompt"] for line in open(merged, encoding="utf-8")]
    final, _ = build.dedupe(rows, ref + held + build.router_data())
    with open(d / "seeds.jsonl", "w", encoding="utf-8") as f:
        for r in final:
            f.write(json.dumps({"prompt": r["prompt"], "axis": r["writer_axis"],
                                "note": r["note"], "writer": r["writer"]},
                               ensure_ascii=False) + "\n")
    print("kept", len(final), "->", d / "seeds.jsonl")


if __name__ == "__main__":
    build_seeds(D, range(1, 5), REFERENCE, D.parent / "intent_set_7" / "merged.jsonl")
