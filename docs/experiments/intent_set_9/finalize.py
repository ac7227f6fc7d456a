"""Join the writer's label with the blind ones for the ninth frozen intent set (the second
set's procedure, ``intent_set_2/finalize.py``, on this folder and its themes).

    python docs/experiments/intent_set_9/finalize.py alignx/router/intent_set_9.jsonl
"""
import importlib.util
import sys
from pathlib import Path

D = Path(__file__).resolve().parent
THEMES = ("personal_money", "law_and_justice", "travel_and_living_abroad",
          "small_business_freelancing")
spec = importlib.util.spec_from_file_location("set2_finalize", D.parent / "intent_set_2" / "finalize.py")
set2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(set2)

if __name__ == "__main__":
    set2.finalize(D, THEMES, sys.argv[1])
