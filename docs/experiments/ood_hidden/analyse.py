"""OOD score candidates on design data (ood_set.jsonl only). Prints AUROC and flag rates."""
import pickle, sys
import numpy as np
from alignx.router.mocae import MoCaERouter
from alignx.router import metrics as M

d = pickle.load(open(sys.argv[1], "rb"))
router = MoCaERouter.load(sys.argv[2]) if len(sys.argv) > 2 else None
ind_keys = ["test", "set:intent_set", "set:intent_set_5", "set:intent_set_6", "set:intent_validation"]
extra = [k for k in d["ft"] if k.startswith("ood") and k != "ood"]

def f32(a): return a.astype(np.float32)

def knn_score(ref, q, k):
    out = []
    for i in range(0, len(q), 512):
        s = q[i:i+512] @ ref.T
        part = -np.partition(-s, k - 1, axis=1)[:, :k]  # top-k similarities
        out.append(1 - part.min(1))  # distance to k-th nearest
    return np.concatenate(out)

def maha(ref, yref, q, shrink=0.1):
    mus = np.stack([ref[yref == c].mean(0) for c in np.unique(yref)])
    X = ref - mus[np.searchsorted(np.unique(yref), yref)]
    cov = X.T @ X / len(X)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    P = np.linalg.inv(cov)
    dd = [np.einsum("nd,de,ne->n", q - m, P, q - m) for m in mus]
    return np.min(np.stack(dd, 1), 1)

rows = []
def report(name, score_fn):
    val = np.concatenate([score_fn("validation"), score_fn("calibration")])
    thr = np.quantile(val, 0.99)
    ind = np.concatenate([score_fn("test"), score_fn("set:intent_set")])
    o = score_fn("ood")
    r = {"score": name, "auroc": M.auroc(o, ind), "ood": (o > thr).mean()}
    for k in ind_keys: r[k.replace("set:", "")] = (score_fn(k) > thr).mean()
    # TPR at 5% FPR on validation
    r["ood@5%"] = (o > np.quantile(val, 0.95)).mean()
    rows.append(r)
    print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)

cache = {}
for enc in ("frozen", "ft"):
    for L in range(1, 7):
        ref = f32(np.concatenate([d[enc]["train"][L], d[enc]["seeds"][L]]))
        yref = np.concatenate([d["labels"]["train"], d["labels"]["seeds"]])
        for k in (1, 10):
            report(f"{enc} L{L} knn{k}", lambda b, ref=ref, k=k, L=L, enc=enc: knn_score(ref, f32(d[enc][b][L]), k))
        report(f"{enc} L{L} maha", lambda b, ref=ref, yref=yref, L=L, enc=enc: maha(ref, yref, f32(d[enc][b][L])))
if router is not None:
    report("shipped latent centroid", lambda b: router.predict(f32(d["ft"][b][6])).ood_score)
