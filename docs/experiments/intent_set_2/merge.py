"""Merge the writers' files, drop exact and near duplicates, write the blind files (two halves,
one per labeller). Run from the repository root with ALIGNX_DATA_DIR set (the near-duplicate
check reads seed 0's router prompts); outputs go next to this file."""
import sys
from pathlib import Path

from alignx.config import load_config
from alignx.router.calibrate import gather_prompts
from alignx.router.targets import read_intent_prompts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "intent_seeds_2"))
from build import dedupe, read_writer, write_blind  # noqa: E402

D = Path(__file__).resolve().parent
THEMES = {1: "workplace", 2: "casual", 3: "tech_science", 4: "everyday_life", 5: "creative",
          6: "education_society"}
rows = [r for k in sorted(THEMES)
        for r in read_writer(D / f"writer_{k}.jsonl", {"theme": THEMES[k]})]
print("written", len(rows))
seeds, _ = read_intent_prompts(name="intent_seeds.jsonl")
set1, _ = read_intent_prompts(name="intent_set.jsonl")
cfg = load_config("jobs/configs/smollm2_cpu.yaml", run_dir="/tmp/iset2_cfg")
data = [t for s in ("train", "validation", "test") for t in gather_prompts(cfg, s)[0]]
final, _ = dedupe(rows, seeds + set1 + data)  # the third set's build.py, same rule
write_blind(final, D, 20261203)
