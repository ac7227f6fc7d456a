"""Write ``alignx/router/ood_set_2.jsonl`` from the four writers' files (in writer order).

    python docs/experiments/ood_set_2/build.py

Each row keeps the writer's ``text`` and ``kind`` and gains ``writer`` (1-4). The writers
followed ``docs/experiments/ood_set_2_guide.md`` and saw no file of the project.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[2] / "alignx" / "router" / "ood_set_2.jsonl"
KINDS = {"code": 6, "log": 6, "data": 6, "markup": 5, "math": 5, "other-language": 7, "noise": 5}

rows = []
for w in range(1, 5):
    mine = [json.loads(line) for line in (HERE / f"writer_{w}.jsonl").read_text().splitlines()
            if line.strip()]
    counts = {k: sum(r["kind"] == k for r in mine) for k in KINDS}
    assert counts == KINDS, (w, counts)
    rows += [{"text": r["text"], "kind": r["kind"], "writer": w} for r in mine]
assert len({r["text"] for r in rows}) == len(rows), "a text is written twice"
tmp = OUT.with_suffix(".tmp")
tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
tmp.replace(OUT)
print(f"wrote {len(rows)} texts to {OUT}")
