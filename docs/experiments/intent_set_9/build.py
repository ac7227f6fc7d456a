"""Build the ninth frozen intent set's blind files from the writers' files
(``docs/experiments/seed_soup_protocol.md``). Run from the repository root with ALIGNX_DATA_DIR
set (the near-duplicate check reads seed 0's router prompts).

    python docs/experiments/intent_set_9/build.py     # -> intent_set_9/{merged,blind_0,blind_1}.jsonl
    python docs/experiments/intent_set_9/finalize.py alignx/router/intent_set_9.jsonl  # after labelling

A prompt is dropped when it is an exact or near duplicate (cosine >= 0.9 on frozen
all-MiniLM-L6-v2) of any seed (both boundary rounds included), of intent sets 1-8, of the intent
validation prompts, of seed 0's router data, or of an earlier prompt of the set (the fourth
set's procedure and code).
"""
import importlib.util
from pathlib import Path

D = Path(__file__).resolve().parent
THEMES = {"U": "personal_money", "V": "law_and_justice", "W": "travel_and_living_abroad",
          "Y": "small_business_freelancing"}
REFERENCE = ("intent_seeds.jsonl", "intent_seeds_2.jsonl", "intent_validation.jsonl",
             "intent_set.jsonl", "intent_set_2.jsonl", "intent_set_3.jsonl", "intent_set_4.jsonl",
             "intent_set_5.jsonl", "intent_set_6.jsonl", "intent_set_7.jsonl",
             "intent_set_8.jsonl", "intent_seeds_3.jsonl",
             str(D.parent / "seeds_boundary_2" / "seeds.jsonl"))

spec = importlib.util.spec_from_file_location("set4_build", D.parent / "intent_set_4" / "build.py")
set4 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(set4)

if __name__ == "__main__":
    set4.build_set(D, THEMES, REFERENCE, 20261222)
