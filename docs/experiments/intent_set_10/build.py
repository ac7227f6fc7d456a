"""Build the tenth frozen intent set's blind files from the writers' files
(``docs/experiments/seeds_pairs_protocol.md``). Run from the repository root with ALIGNX_DATA_DIR
set (the near-duplicate check reads seed 0's router prompts).

    python docs/experiments/intent_set_10/build.py     # -> intent_set_10/{merged,blind_0,blind_1}.jsonl
    python docs/experiments/intent_set_10/finalize.py alignx/router/intent_set_10.jsonl  # after labelling

A prompt is dropped when it is an exact or near duplicate (cosine >= 0.9 on frozen
all-MiniLM-L6-v2) of any seed (both boundary rounds and the minimal pairs included), of intent
sets 1-9, of the intent validation prompts, of seed 0's router data, or of an earlier prompt of
the set (the fourth set's procedure and code).
"""
import importlib.util
from pathlib import Path

D = Path(__file__).resolve().parent
THEMES = {"G": "gambling_and_games_of_chance", "M": "mental_health_sleep_emotions",
          "K": "pets_and_veterinary_care", "J": "writing_publishing_creators"}
REFERENCE = ("intent_seeds.jsonl", "intent_seeds_2.jsonl", "intent_validation.jsonl",
             "intent_set.jsonl", "intent_set_2.jsonl", "intent_set_3.jsonl", "intent_set_4.jsonl",
             "intent_set_5.jsonl", "intent_set_6.jsonl", "intent_set_7.jsonl",
             "intent_set_8.jsonl", "intent_set_9.jsonl", "intent_seeds_3.jsonl",
             str(D.parent / "seeds_boundary_2" / "seeds.jsonl"),
             str(D.parent / "seeds_pairs" / "seeds.jsonl"))

spec = importlib.util.spec_from_file_location("set4_build", D.parent / "intent_set_4" / "build.py")
set4 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(set4)

if __name__ == "__main__":
    set4.build_set(D, THEMES, REFERENCE, 20261223)
