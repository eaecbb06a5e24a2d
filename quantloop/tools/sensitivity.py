"""measure_sensitivity: the per-unit sensitivity table of a model (cached), and its heatmap."""

from __future__ import annotations

from pathlib import Path

from quantloop.search.plots import sensitivity_heatmap
from quantloop.search.schemas import SensitivityRequest, SensitivityResult
from quantloop.search.sensitivity import measure_sensitivity as measure


def measure_sensitivity(req: SensitivityRequest, progress=None) -> SensitivityResult:
    """Quantize one unit at a time at each candidate type, measure the KLD against the float model on the
    calibration text; rows already in the cache are not measured again. Writes the heatmap when asked."""
    result = measure(req, progress)
    if req.heatmap_png:
        png = sensitivity_heatmap(result.rows, Path(req.heatmap_png), f"{Path(result.model).name}: KLD with one unit quantized")
        result = result.model_copy(update={"heatmap_png": str(png)})
    return result
