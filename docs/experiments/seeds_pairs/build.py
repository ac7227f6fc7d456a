"""Write the minimal-pair seeds (``docs/experiments/seeds_pairs_protocol.md``) from the four
writers' files: ``seeds_pairs/seeds.jsonl``. Run from the repository root with ALIGNX_DATA_DIR
set (the near-duplicate check reads seed 0's router prompts).

    python docs/experiments/seeds_pairs/build.py

The two prompts of a pair are near-duplicates of each other by design, so the intent sets'
dedupe (which keeps the first of two near-duplicates) would halve every pair. Here a **pair**
is dropped, whole, when either prompt is an exact or near duplicate (cosine >= 0.9 on frozen
all-MiniLM-L6-v2, the intent sets' threshold and encoder) of a shipped seed or intent set (sets
1-9), of the second boundary round's seeds, of seed 0's router data, or of a prompt of an
earlier kept pair. It also prints how close the pairs are (cosine within a pair).
"""
import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from alignx.router.features import build_encoder
from alignx.router.targets import read_intent_prompts

D = Path(__file__).resolve().parent
WRITERS = ("P1", "P2", "P3", "P4")
REFERENCE = ("intent_seeds.jsonl", "intent_seeds_2.jsonl", "intent_seeds_3.jsonl",
             "intent_validation.jsonl", "intent_set.jsonl", "intent_set_2.jsonl",
             "intent_set_3.jsonl", "intent_set_4.jsonl", "intent_set_5.jsonl",
             "intent_set_6.jsonl", "intent_set_7.jsonl", "intent_set_8.jsonl",
             "intent_set_9.jsonl")
spec = importlib.util.spec_from_file_location("seeds2_build", D.parent / "intent_seeds_2" / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


def read_pairs(path: Path, writer: str) -> list[list[dict]]:
    """The writer's pairs, in file order: two rows of different axes each."""
    by_id: dict[int, list[dict]] = defaultdict(list)
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if line.strip():
            r = json.loads(line)
            assert r["axis"] in build.AX and r["prompt"].strip(), (path, n, r)
            by_id[int(r["pair"])].append({"prompt": r["prompt"].strip(), "axis": r["axis"],
                                          "note": r.get("note", ""), "writer": writer,
                                          "pair": f"{writer}-{int(r['pair'])}"})
    for pid, rows in by_id.items():
        assert len(rows) == 2 and rows[0]["axis"] != rows[1]["axis"], (path, pid, rows)
    return list(by_id.values())


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    pairs = [p for w in WRITERS for p in read_pairs(D / f"writer_{w}.jsonl", w)]
    print("written", len(pairs), "pairs")
    ref = [p for name in REFERENCE for p in read_intent_prompts(name=name)[0]]
    ref += read_intent_prompts(path=D.parent / "seeds_boundary_2" / "seeds.jsonl")[0]
    ref += build.router_data()
    enc = build_encoder("sentence", build.CFG.model, None)
    texts = [r["prompt"] for p in pairs for r in p]
    h, g = unit(enc.encode(texts)), unit(enc.encode(ref))
    sim_ref, sim_self = (h @ g.T).max(axis=1), h @ h.T
    exact = {build.norm(t) for t in ref}
    kept: list[list[dict]] = []
    kept_idx: list[int] = []
    within = []
    for i, pair in enumerate(pairs):
        idx = [2 * i, 2 * i + 1]
        why = next((f"{texts[k]!r}: near-duplicate of a reference prompt ({sim_ref[k]:.3f})"
                    for k in idx if sim_ref[k] >= build.NEAR or build.norm(texts[k]) in exact),
                   None)
        if why is None:
            clash = [(k, j) for k in idx for j in kept_idx if sim_self[k, j] >= build.NEAR]
            if clash:
                k, j = clash[0]
                why = f"{texts[k]!r}: near-duplicate of {texts[j]!r} (another pair)"
        if why:
            print("  DROP pair", pair[0]["pair"], "--", why[:220])
            continue
        kept.append(pair)
        kept_idx += idx
        within.append(float(sim_self[idx[0], idx[1]]))
    with open(D / "seeds.jsonl", "w", encoding="utf-8") as f:
        for pair in kept:
            for r in pair:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = defaultdict(int)
    for pair in kept:
        for r in pair:
            counts[r["axis"]] += 1
    print("kept", len(kept), "pairs,", 2 * len(kept), "prompts", dict(counts))
    p10, p90 = np.percentile(within, [10, 90])
    print(f"cosine within a pair: median {np.median(within):.3f}, 10th-90th percentile "
          f"{p10:.3f}-{p90:.3f}")


if __name__ == "__main__":
    main()
