"""Readout of docs/experiments/seeds_boundary_2_protocol.md: MoCaE accuracy / ECE of saved
routers on the test split, intent validation and sets 5, 6 and 7 (``sets_5_6_7``: the
decision data), and with --set-8 on the eighth set (the measurement, once).

    python docs/experiments/seeds_boundary_2/readout.py [--set-8] ROUTER_RUN_DIR...
"""
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "boundary_readout", Path(__file__).resolve().parent.parent / "seeds_boundary" / "readout.py")
boundary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(boundary)

if __name__ == "__main__":
    args = sys.argv[1:]
    boundary.readout([a for a in args if a != "--set-8"],
                     ("intent_set_5.jsonl", "intent_set_6.jsonl", "intent_set_7.jsonl"),
                     ("intent_set_8.jsonl",) if "--set-8" in args else (), "sets_5_6_7")
