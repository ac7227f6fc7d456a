"""Merge the writers' files, drop exact and near duplicates, write the blind files (two halves,
one per labeller). Run from the repository root with ALIGNX_DATA_DIR set (the near-duplicate
check reads seed 0's router prompts); outputs go next to this file."""
import json
import random
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router.calibrate import gather_prompts
from alignx.router.features import build_encoder
from alignx.router.targets import read_intent_prompts

D = Path(__file__).resolve().parent
THEMES = {1: "workplace", 2: "casual", 3: "tech_science", 4: "everyday_life", 5: "creative",
          6: "education_society"}
rows = []
for k in sorted(THEMES):
    for n, line in enumerate(open(D / f"writer_{k}.jsonl", encoding="utf-8"), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        assert r["axis"] in ("helpfulness", "harmlessness", "honesty"), (k, n, r)
        assert isinstance(r["prompt"], str) and r["prompt"].strip(), (k, n)
        rows.append({"prompt": r["prompt"].strip(), "writer_axis": r["axis"],
                     "note": r.get("note", ""), "theme": THEMES[k]})
print("written", len(rows))


def norm(s):
    return " ".join(s.lower().split())


seeds, _ = read_intent_prompts(name="intent_seeds.jsonl")
set1, _ = read_intent_prompts(name="intent_set.jsonl")
seen, keep, dropped = {norm(p) for p in seeds + set1}, [], []
for r in rows:
    if norm(r["prompt"]) in seen:
        dropped.append((r["prompt"], "exact duplicate"))
        continue
    seen.add(norm(r["prompt"]))
    keep.append(r)
cfg = load_config("jobs/configs/smollm2_cpu.yaml", run_dir="/tmp/iset2_cfg")
data = [t for s in ("train", "validation", "test") for t in gather_prompts(cfg, s)[0]]
enc = build_encoder("sentence", cfg.model, None)
ref_texts = seeds + set1 + data
ref = enc.encode(ref_texts)
h = enc.encode([r["prompt"] for r in keep])
ref /= np.linalg.norm(ref, axis=1, keepdims=True)
h /= np.linalg.norm(h, axis=1, keepdims=True)
sim_ref = h @ ref.T
sim_self = h @ h.T
final = []
for i, r in enumerate(keep):
    j = int(sim_ref[i].argmax())
    if sim_ref[i, j] >= 0.9:
        dropped.append((r["prompt"], f"near-duplicate ({sim_ref[i, j]:.3f}) of {ref_texts[j]!r}"))
        continue
    earlier = [k for k in range(i) if sim_self[i, k] >= 0.9 and keep[k] in final]
    if earlier:
        dropped.append((r["prompt"], f"near-duplicate of {keep[earlier[0]]['prompt']!r}"))
        continue
    r["max_cos_to_reference"] = round(float(sim_ref[i, j]), 3)
    final.append(r)
print("kept", len(final), "dropped", len(dropped))
for p, why in dropped:
    print("  DROP", repr(p)[:120], "--", why[:200])
rng = random.Random(20261203)
order = list(range(len(final)))
rng.shuffle(order)
for new_id, i in enumerate(order):
    final[i]["id"] = new_id
final.sort(key=lambda r: r["id"])
with open(D / "merged.jsonl", "w", encoding="utf-8") as f:
    for r in final:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
for k in (0, 1):  # ids alternate between the two blind labellers
    with open(D / f"blind_{k}.jsonl", "w", encoding="utf-8") as f:
        for r in final[k::2]:
            f.write(json.dumps({"id": r["id"], "prompt": r["prompt"]}, ensure_ascii=False) + "\n")
