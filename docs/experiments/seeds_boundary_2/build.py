"""Write the second round of boundary-case seeds (``docs/experiments/seeds_boundary_2_protocol.md``)
from the four writers' files (``writer_5.jsonl`` ... ``writer_8.jsonl``): ``seeds_boundary_2/seeds.jsonl``.
Run from the repository root with ALIGNX_DATA_DIR set, after ``intent_set_8/build.py``.

    python docs/experiments/seeds_boundary_2/build.py

Dropped: exact or near duplicates (cosine >= 0.9 on frozen all-MiniLM-L6-v2) of any shipped seed
or intent set (the first round's seeds and the seventh set included), of the eighth set's
prompts, of seed 0's router data, or of an earlier seed: the first round's code.
"""
import importlib.util
from pathlib import Path

D = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("boundary_build", D.parent / "seeds_boundary" / "build.py")
boundary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(boundary)

if __name__ == "__main__":
    boundary.build_seeds(D, range(5, 9),
                         (*boundary.REFERENCE, "intent_seeds_3.jsonl", "intent_set_7.jsonl"),
                         D.parent / "intent_set_8" / "merged.jsonl")
