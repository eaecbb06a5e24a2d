"""Where precision goes: per-tensor sensitivity (sensitivity.py, measure.py), the tensors a map can set (tensors.py),
greedy and ILP allocation under a size budget (allocate.py, budget.py), the optuna multi-objective search (study.py),
precision-map files (precision_maps.py), deployment targets (hardware.py), pictures (plots.py) and the tools'
request/result models (schemas.py)."""
