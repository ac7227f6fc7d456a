"""Build the third frozen intent set's blind files and the second seed set from the writers'
files (``docs/experiments/intent_seeds_2_protocol.md``). Run from the repository root with
ALIGNX_DATA_DIR set (the near-duplicate checks read seed 0's router prompts).

    python docs/experiments/intent_seeds_2/build.py set3    # -> intent_set_3/{merged,blind_0,blind_1}.jsonl
    python docs/experiments/intent_set_3/finalize.py alignx/router/intent_set_3.jsonl  # after labelling
    python docs/experiments/intent_seeds_2/build.py seeds   # -> alignx/router/intent_{seeds_2,validation}.jsonl

``set3`` drops a prompt that is an exact or near duplicate (cosine >= 0.9 on frozen
all-MiniLM-L6-v2) of an old seed, of the first two sets, of seed 0's router data, or of an
earlier prompt of the set. ``seeds`` (after the third set is frozen) drops a new seed that is a
duplicate of an old seed, of any frozen set (the third included: the pair is resolved on the
seeds' side, so the test set does not depend on the seeds), of the router data or of an earlier
new seed, then holds out 20% of each (register, intent) cell, with a fixed RNG, as the intent
validation prompts.
"""
import collections
import json
import random
import sys
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router.calibrate import gather_prompts
from alignx.router.features import build_encoder
from alignx.router.targets import read_intent_prompts

ROOT = Path(__file__).resolve().parents[3]
SEEDS_DIR = Path(__file__).resolve().parent
SET3_DIR = SEEDS_DIR.parent / "intent_set_3"
PKG = ROOT / "alignx" / "router"
SET3_THEMES = {"A": "health_body", "B": "money_law", "C": "travel_hobbies",
               "D": "family_online"}
REGISTERS = {1: "casual", 2: "professional", 3: "narrative", 4: "terse"}
AX = ("helpfulness", "harmlessness", "honesty")
NEAR = 0.9
CFG = load_config("jobs/configs/smollm2_cpu.yaml", run_dir="/tmp/iset3_cfg")


def read_writer(path: Path, tag: dict) -> list[dict]:
    rows = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        assert r["axis"] in AX, (path, n, r)
        assert isinstance(r["prompt"], str) and r["prompt"].strip(), (path, n)
        rows.append({"prompt": r["prompt"].strip(), "writer_axis": r["axis"],
                     "note": r.get("note", ""), **tag})
    return rows


def norm(s: str) -> str:
    return " ".join(s.lower().split())


def dedupe(rows: list[dict], ref_texts: list[str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Drop exact and near duplicates of ``ref_texts`` and of earlier kept rows."""
    seen, keep, dropped = {norm(p) for p in ref_texts}, [], []
    for r in rows:
        if norm(r["prompt"]) in seen:
            dropped.append((r["prompt"], "exact duplicate"))
            continue
        seen.add(norm(r["prompt"]))
        keep.append(r)
    enc = build_encoder("sentence", CFG.model, None)
    ref = enc.encode(ref_texts)
    h = enc.encode([r["prompt"] for r in keep])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    sim_ref, sim_self = h @ ref.T, h @ h.T
    final, kept_idx = [], []
    for i, r in enumerate(keep):
        j = int(sim_ref[i].argmax())
        if sim_ref[i, j] >= NEAR:
            dropped.append((r["prompt"], f"near-duplicate ({sim_ref[i, j]:.3f}) of {ref_texts[j]!r}"))
            continue
        earlier = [k for k in kept_idx if sim_self[i, k] >= NEAR]
        if earlier:
            dropped.append((r["prompt"], f"near-duplicate of {keep[earlier[0]]['prompt']!r}"))
            continue
        r["max_cos_to_reference"] = round(float(sim_ref[i, j]), 3)
        final.append(r)
        kept_idx.append(i)
    print("kept", len(final), "dropped", len(dropped))
    for p, why in dropped:
        print("  DROP", repr(p)[:120], "--", why[:200])
    return final, dropped


def router_data() -> list[str]:
    return [t for s in ("train", "validation", "test") for t in gather_prompts(CFG, s)[0]]


def new_seed_rows() -> list[dict]:
    return [r for k, reg in REGISTERS.items()
            for r in read_writer(SEEDS_DIR / f"writer_{k}.jsonl", {"register": reg})]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_blind(final: list[dict], d: Path, seed: int) -> None:
    """Shuffle the kept prompts into new ids (fixed RNG) and write ``merged.jsonl`` and the
    two labellers' blind halves (alternate ids) into folder ``d``."""
    rng = random.Random(seed)
    order = list(range(len(final)))
    rng.shuffle(order)
    for new_id, i in enumerate(order):
        final[i]["id"] = new_id
    final.sort(key=lambda r: r["id"])
    write_jsonl(d / "merged.jsonl", final)
    for k in (0, 1):  # ids alternate between the two blind labellers
        write_jsonl(d / f"blind_{k}.jsonl",
                    [{"id": r["id"], "prompt": r["prompt"]} for r in final[k::2]])


def build_set3() -> None:
    rows = [r for k, theme in SET3_THEMES.items()
            for r in read_writer(SET3_DIR / f"writer_{k}.jsonl", {"theme": theme})]
    print("written", len(rows))
    ref = [p for name in ("intent_seeds.jsonl", "intent_set.jsonl", "intent_set_2.jsonl")
           for p in read_intent_prompts(name=name)[0]]
    ref += router_data()
    final, _ = dedupe(rows, ref)
    write_blind(final, SET3_DIR, 20261204)


def build_seeds() -> None:
    rows = new_seed_rows()
    print("written", len(rows))
    ref = [p for name in ("intent_seeds.jsonl", "intent_set.jsonl", "intent_set_2.jsonl",
                          "intent_set_3.jsonl") for p in read_intent_prompts(name=name)[0]]
    final, _ = dedupe(rows, ref + router_data())
    rng = random.Random(20261204)
    cells = collections.defaultdict(list)
    for r in final:
        cells[(r["register"], r["writer_axis"])].append(r)
    held = set()
    for key in sorted(cells):
        idx = list(range(len(cells[key])))
        rng.shuffle(idx)
        held |= {id(cells[key][i]) for i in idx[: round(0.2 * len(idx))]}
    out = {True: [], False: []}
    for r in final:
        out[id(r) in held].append({"prompt": r["prompt"], "axis": r["writer_axis"],
                                   "register": r["register"], "note": r["note"]})
    for name, part in (("intent_seeds_2.jsonl", out[False]), ("intent_validation.jsonl", out[True])):
        write_jsonl(PKG / name, part)
        print(name, len(part), dict(collections.Counter(r["axis"] for r in part)))


if __name__ == "__main__":
    {"set3": build_set3, "seeds": build_seeds}[sys.argv[1]]()
