"""Build the fourth frozen intent set's blind files from the writers' files
(``docs/experiments/shift_calibration_protocol.md``). Run from the repository root with
ALIGNX_DATA_DIR set (the near-duplicate check reads seed 0's router prompts).

    python docs/experiments/intent_set_4/build.py     # -> intent_set_4/{merged,blind_0,blind_1}.jsonl
    python docs/experiments/intent_set_4/finalize.py alignx/router/intent_set_4.jsonl  # after labelling

A prompt is dropped when it is an exact or near duplicate (cosine >= 0.9 on frozen
all-MiniLM-L6-v2) of any seed, of intent sets 1-3, of the intent validation prompts, of seed
0's router data, or of an earlier prompt of the set (the third set's procedure and code).
"""
import importlib.util
from pathlib import Path

from alignx.router.targets import read_intent_prompts

D = Path(__file__).resolve().parent
THEMES = {"A": "home_diy_vehicles", "B": "food_animals_outdoors", "C": "sports_games_media",
          "D": "civic_history_beliefs"}
REFERENCE = ("intent_seeds.jsonl", "intent_seeds_2.jsonl", "intent_validation.jsonl",
             "intent_set.jsonl", "intent_set_2.jsonl", "intent_set_3.jsonl")

spec = importlib.util.spec_from_file_location("seeds2_build", D.parent / "intent_seeds_2" / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


def build_set(d: Path, themes: dict[str, str], reference: tuple[str, ...], seed: int) -> None:
    """Read ``d``'s writer files (``writer_<key>.jsonl``, one theme each), drop duplicates of
    the ``reference`` files (shipped names, or paths when they hold a "/") and of seed 0's
    router data, write the blind files into ``d`` (later sets' ``build.py`` call this on their
    own folders)."""
    rows = [r for k, theme in themes.items()
            for r in build.read_writer(d / f"writer_{k}.jsonl", {"theme": theme})]
    print("written", len(rows))
    ref = [p for name in reference for p in (read_intent_prompts(path=name) if "/" in name
                                             else read_intent_prompts(name=name))[0]]
    final, _ = build.dedupe(rows, ref + build.router_data())
    build.write_blind(final, d, seed)


if __name__ == "__main__":
    build_set(D, THEMES, REFERENCE, 20261205)
