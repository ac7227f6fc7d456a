"""Design-data sensitivity of the hidden-state Mahalanobis OOD score (ood_set.jsonl only)."""
import pickle, sys
import numpy as np
from alignx.router import metrics as M
d = pickle.load(open(sys.argv[1], "rb"))
fits = pickle.load(open(sys.argv[2], "rb"))["fits"][0]
y_ref = fits["y_tr"]
ind_keys = ["test", "set:intent_set", "set:intent_set_5", "set:intent_set_6", "set:intent_validation"]
blocks = [k for k in sys.argv[3:]] or ["ood"]
def maha_fit(ref, y, shrink):
    cl = np.unique(y); mus = np.stack([ref[y == c].mean(0) for c in cl])
    X = ref - mus[np.searchsorted(cl, y)]; cov = X.T @ X / len(X)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    P = np.linalg.inv(cov)
    return lambda q: np.min(np.stack([np.einsum("nd,de,ne->n", q - m, P, q - m) for m in mus], 1), 1)
for L in (2, 3, 4):
    for shrink in (0.01, 0.1, 0.3):
        g = lambda b: d["ft"][b][L].astype(np.float32)
        ref = np.concatenate([g("train"), g("seeds")])
        sc = maha_fit(ref, y_ref, shrink)
        val = np.concatenate([sc(g("validation")), sc(g("calibration"))]); thr = np.quantile(val, 0.99)
        ind = np.concatenate([sc(g("test")), sc(g("set:intent_set"))])
        out = [f"L{L} shrink {shrink}:"]
        for b in blocks:
            o = sc(g(b)); out.append(f"{b} auroc {M.auroc(o, ind):.3f} flagged {(o > thr).mean():.3f}")
        out += [f"{k.replace('set:intent_','')} {(sc(g(k)) > thr).mean():.3f}" for k in ind_keys]
        print("  ".join(out), flush=True)
