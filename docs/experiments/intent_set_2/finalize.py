"""Join the writer's label with the blind ones.

Stage 1 (no ``labels_2.jsonl`` yet): print the agreement, write the disagreements to
``blind_dis.jsonl`` for a third blind labeller. Stage 2: the majority label of each prompt
(dropped if all three differ), written as the frozen set to argv[1].

    python docs/experiments/intent_set_2/finalize.py alignx/router/intent_set_2.jsonl

The third set's ``finalize.py`` calls :func:`finalize` on its own folder and themes.
"""
import collections
import json
import sys
from pathlib import Path

AX = ("helpfulness", "harmlessness", "honesty")
THEMES = ("workplace", "casual", "tech_science", "everyday_life", "creative",
          "education_society")


def finalize(D: Path, themes: tuple[str, ...], out_path: str) -> None:
    """Join the labels of the set in folder ``D``; see the module docstring."""

    def jsonl(name):
        return [json.loads(line) for line in open(D / name, encoding="utf-8") if line.strip()]

    rows = {r["id"]: r for r in jsonl("merged.jsonl")}
    second = {}
    for k in (0, 1):
        ids = [r["id"] for r in jsonl(f"blind_{k}.jsonl")]
        labs = jsonl(f"labels_{k}.jsonl")
        assert [r["id"] for r in labs] == ids, k
        second.update({r["id"]: r["axis"] for r in labs})
    assert set(second) == set(rows) and all(a in AX for a in second.values())
    dis = [i for i in sorted(rows) if rows[i]["writer_axis"] != second[i]]
    agree = 1 - len(dis) / len(rows)
    cw = collections.Counter(r["writer_axis"] for r in rows.values())
    cs = collections.Counter(second.values())
    pe = sum(cw[a] * cs[a] for a in AX) / len(rows) ** 2  # chance agreement (Cohen's kappa)
    print(f"n {len(rows)} agreement {agree:.3f} kappa {(agree - pe) / (1 - pe):.3f} "
          f"disagreements {len(dis)}")
    print("writer -> blind:", dict(collections.Counter((rows[i]["writer_axis"], second[i])
                                                       for i in dis)))
    if not (D / "labels_2.jsonl").exists():
        with open(D / "blind_dis.jsonl", "w", encoding="utf-8") as f:
            for i in dis:
                f.write(json.dumps({"id": i, "prompt": rows[i]["prompt"]}, ensure_ascii=False) + "\n")
        return
    third = {r["id"]: r["axis"] for r in jsonl("labels_2.jsonl")}
    assert set(third) == set(dis)
    out, dropped = [], []
    for i, r in sorted(rows.items()):
        labels = [r["writer_axis"], second[i]] + ([third[i]] if i in third else [])
        top, n = collections.Counter(labels).most_common(1)[0]
        if n < 2:
            dropped.append((r["prompt"], labels))
            continue
        out.append({"prompt": r["prompt"], "axis": top, "labels": labels, "theme": r["theme"],
                    "note": r["note"]})
    print("final", len(out), dict(collections.Counter(o["axis"] for o in out)),
          "dropped (no majority)", len(dropped))
    print("writer overruled", sum(o["labels"][0] != o["axis"] for o in out))
    for prompt, labels in dropped:
        print("  NO MAJORITY", labels, prompt[:100])
    out.sort(key=lambda o: (themes.index(o["theme"]), AX.index(o["axis"])))
    with open(out_path, "w", encoding="utf-8") as f:
        for o in out:
            f.write(json.dumps(o, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    finalize(Path(__file__).resolve().parent, THEMES, sys.argv[1])
