"""Split the fourth frozen intent set by theme for the decision run of ``seeds_4_protocol.md``.

Seed half (joins the decision run's training seeds): ``home_diy_vehicles`` and
``food_animals_outdoors``; decision half (neither arm trains or calibrates on it):
``sports_games_media`` and ``civic_history_beliefs``. Rows are copied unchanged, in file order.

    python docs/experiments/seeds_4/split.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SET_4 = HERE.parents[2] / "alignx" / "router" / "intent_set_4.jsonl"
HALVES = {"set4_seed_half.jsonl": ("home_diy_vehicles", "food_animals_outdoors"),
          "set4_decision_half.jsonl": ("sports_games_media", "civic_history_beliefs")}

if __name__ == "__main__":
    lines = SET_4.read_text().splitlines()
    for name, themes in HALVES.items():
        keep = [line for line in lines if json.loads(line)["theme"] in themes]
        (HERE / name).write_text("\n".join(keep) + "\n")
        print(name, len(keep))
