"""Join the writer's label with the blind ones for the tenth frozen intent set (the second
set's procedure, ``intent_set_2/finalize.py``, on this folder and its themes).

    python docs/experiments/intent_set_10/finalize.py alignx/router/intent_set_10.jsonl
"""
import importlib.util
import sys
from pathlib import Path

D = Path(__file__).resolve().parent
THEMES = ("gambling_and_games_of_chance", "mental_health_sleep_emotions",
          "pets_and_veterinary_care", "writing_publishing_creators")
spec = importlib.util.spec_from_file_location("set2_finalize", D.parent / "intent_set_2" / "finalize.py")
set2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(set2)

if __name__ == "__main__":
    set2.finalize(D, THEMES, sys.argv[1])
