"""Build, then finalize, a frozen intent set from the writers' files in its folder
``docs/experiments/intent_set_<N>/`` (one command for every set from the eleventh on; sets 4-10
keep the per-set ``build.py`` / ``finalize.py`` their protocols cite). Run from the repository
root with ALIGNX_DATA_DIR set (the near-duplicate check reads seed 0's router prompts).

    python docs/experiments/frozen_set.py build 11              # -> {merged,blind_0,blind_1}.jsonl
    python docs/experiments/frozen_set.py finalize 11 alignx/router/intent_set_11.jsonl  # after labelling

``build``: a prompt is dropped when it is an exact or near duplicate (cosine >= 0.9 on frozen
all-MiniLM-L6-v2) of any seed (the unadopted seed rounds included), of every earlier intent set,
of the intent validation prompts, of seed 0's router data, or of an earlier prompt of the set
(the fourth set's procedure and code, ``intent_set_4/build.py``). ``finalize``: the writer's
label and the blind ones joined by majority (the second set's procedure,
``intent_set_2/finalize.py``); the first run writes ``blind_dis.jsonl`` for the third label.
"""
import argparse
import importlib.util
from pathlib import Path

D = Path(__file__).resolve().parent

#: per set: writer key -> theme, and the blind files' shuffling seed
SETS: dict[int, tuple[dict[str, str], int]] = {
    11: ({"N": "alcohol_cannabis_nightlife", "D": "death_funerals_inheritance",
          "O": "office_jobs_hiring_hr", "T": "tattoos_fashion_body_modification"}, 20261224),
    12: ({"A": "sports_fitness_martial_arts", "B": "cars_motorbikes_driving",
          "C": "home_repair_diy", "E": "history_politics_religion"}, 20261225),
    13: ({"H": "health_medicine_pharmacy", "I": "computers_phones_software_it",
          "S": "chemistry_physics_science_experiments",
          "F": "hunting_fishing_firearms_outdoor_survival"}, 20261226),
}
SEED_FILES = ("intent_seeds.jsonl", "intent_seeds_2.jsonl", "intent_seeds_3.jsonl",
              "intent_validation.jsonl", "intent_set.jsonl",
              str(D / "seeds_boundary_2" / "seeds.jsonl"), str(D / "seeds_pairs" / "seeds.jsonl"))


def reference(n: int) -> tuple[str, ...]:
    """The files set ``n`` must not repeat: the seed files and every earlier frozen set."""
    return (*SEED_FILES, *(f"intent_set_{k}.jsonl" for k in range(2, n)))


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("build", "finalize"))
    ap.add_argument("set", type=int, choices=sorted(SETS), help="the set's number")
    ap.add_argument("out", nargs="?", help="finalize: the frozen set's path")
    a = ap.parse_args()
    themes, seed = SETS[a.set]
    folder = D / f"intent_set_{a.set}"
    if a.step == "build":
        _load("set4_build", D / "intent_set_4" / "build.py").build_set(
            folder, themes, reference(a.set), seed)
    else:
        if not a.out:
            ap.error("finalize needs OUT, the frozen set's path")
        _load("set2_finalize", D / "intent_set_2" / "finalize.py").finalize(
            folder, tuple(themes.values()), a.out)
