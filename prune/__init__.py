"""Calibration, allocation and rewriting of routed experts (installed as `moe2gguf.prune`).

calibrate.py  the `calibrate` verb: layer-by-layer pass, hooks, CALIB/ writer
scores.py     observers (`add_batch`, float64 running sums) and the pure score math
allocate.py   layouts and budget allocation (pure tensor-in/tensor-out functions)
rewrite.py    slicing experts (optional least-squares refit) and writing OUT/
prune.py      the `prune` verb
"""
