"""Join the writer's label with the blind ones for the fourth frozen intent set (the second
set's procedure, ``intent_set_2/finalize.py``, on this folder and its themes).

    python docs/experiments/intent_set_4/finalize.py alignx/router/intent_set_4.jsonl
"""
import importlib.util
import sys
from pathlib import Path

D = Path(__file__).resolve().parent
THEMES = ("home_diy_vehicles", "food_animals_outdoors", "sports_games_media",
          "civic_history_beliefs")
spec = importlib.util.spec_from_file_location("set2_finalize", D.parent / "intent_set_2" / "finalize.py")
set2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(set2)

if __name__ == "__main__":
    set2.finalize(D, THEMES, sys.argv[1])
