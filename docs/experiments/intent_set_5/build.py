"""Build the fifth frozen intent set's blind files from the writers' files
(``docs/experiments/seeds_4_protocol.md``). Run from the repository root with
ALIGNX_DATA_DIR set (the near-duplicate check reads seed 0's router prompts).

    python docs/experiments/intent_set_5/build.py     # -> intent_set_5/{merged,blind_0,blind_1}.jsonl
    python docs/experiments/intent_set_5/finalize.py alignx/router/intent_set_5.jsonl  # after labelling

A prompt is dropped when it is an exact or near duplicate (cosine >= 0.9 on frozen
all-MiniLM-L6-v2) of any seed, of intent sets 1-4, of the intent validation prompts, of seed
0's router data, or of an earlier prompt of the set (the fourth set's procedure and code).
"""
import importlib.util
from pathlib import Path

from alignx.router.targets import read_intent_prompts

D = Path(__file__).resolve().parent
THEMES = {"E": "relationships_social", "F": "shopping_beauty_products",
          "G": "nature_weather_space", "H": "language_music_arts"}
REFERENCE = ("intent_seeds.jsonl", "intent_seeds_2.jsonl", "intent_validation.jsonl",
             "intent_set.jsonl", "intent_set_2.jsonl", "intent_set_3.jsonl", "intent_set_4.jsonl")

spec = importlib.util.spec_from_file_location("seeds2_build", D.parent / "intent_seeds_2" / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)

if __name__ == "__main__":
    rows = [r for k, theme in THEMES.items()
            for r in build.read_writer(D / f"writer_{k}.jsonl", {"theme": theme})]
    print("written", len(rows))
    ref = [p for name in REFERENCE for p in read_intent_prompts(name=name)[0]]
    final, _ = build.dedupe(rows, ref + build.router_data())
    build.write_blind(final, D, 20261206)
