"""Deployment targets. `cpu` (and `cuda` where a GPU is present) are measured (llama-bench on this machine).
The edge targets are not here, so their speed and energy are a roofline ESTIMATE, and every such field is
named estimated_*: token generation at batch 1 reads every weight once per token, so

    estimated_tg_tokens_per_s = 1 / max(weight_bytes / memory_bandwidth, 2 * n_weights / int8_ops_per_s)
    estimated_energy_mj_per_token = (weight_bytes * dram_pj_per_byte + 2 * n_weights * pj_per_op) / 1e9

The numbers per target and their sources are in the README's table (`TARGETS` below is that table).
"""

from __future__ import annotations

from quantloop.errors import InputError

MEASURED = ("cpu", "cuda")
# reference device, memory bandwidth (GB/s), int8 throughput (TOPS), source of each
TARGETS: dict[str, dict] = {
    "arm-neon": {"device": "Raspberry Pi 4 (4x Cortex-A72 1.8 GHz, LPDDR4-3200, 32-bit bus)", "bandwidth_gb_s": 12.8,
                 "int8_tops": 0.23, "source": "bandwidth: 3200 MT/s x 4 bytes; int8: 4 cores x 1.8 GHz x 32 ops/cycle (2 x 128-bit NEON MLA pipes)"},
    "arm-dotprod": {"device": "Raspberry Pi 5 (4x Cortex-A76 2.4 GHz, LPDDR4X-4267, 32-bit bus)", "bandwidth_gb_s": 17.1,
                    "int8_tops": 0.61, "source": "bandwidth: 4267 MT/s x 4 bytes; int8: 4 cores x 2.4 GHz x 64 ops/cycle (2 x 128-bit SDOT pipes)"},
    "hexagon": {"device": "Snapdragon 8 Gen 3 Hexagon NPU, LPDDR5X-4800 (9600 MT/s), 64-bit bus", "bandwidth_gb_s": 76.8,
                "int8_tops": 34.0, "source": "bandwidth: 9600 MT/s x 8 bytes (Qualcomm product brief: LPDDR5x up to 4800 MHz); int8: assumed 34 TOPS, no per-unit figure is published"},
    "apple-ane": {"device": "Apple M1 Neural Engine, LPDDR4X-4266, 128-bit bus", "bandwidth_gb_s": 68.3,
                  "int8_tops": 11.0, "source": "bandwidth: 4266 MT/s x 16 bytes; 11 TOPS: Apple's M1 announcement (Nov 2020)"},
    "tensorrt": {"device": "NVIDIA Jetson Orin Nano 8GB (TensorRT)", "bandwidth_gb_s": 68.0,
                 "int8_tops": 20.0, "source": "NVIDIA Jetson Orin Nano data sheet: 68 GB/s; 40 TOPS int8 sparse, taken as 20 dense"},
    "intel-vnni": {"device": "Intel Core i7-1165G7 (4 cores 2.8 GHz, AVX-512 VNNI), LPDDR4X-4266, 128-bit bus", "bandwidth_gb_s": 68.3,
                   "int8_tops": 1.43, "source": "bandwidth: 4266 MT/s x 16 bytes; int8: 4 cores x 2.8 GHz x 128 ops/cycle (one 512-bit VPDPBUSD per cycle)"},
}
# energy per byte moved from DRAM and per int8 op: order-of-magnitude figures (Horowitz, ISSCC 2014: 45 nm,
# DRAM about 1.3-2.6 nJ per 64-bit access; 8-bit add 0.03 pJ, 8-bit multiply 0.2 pJ)
DRAM_PJ_PER_BYTE = 160.0
PJ_PER_INT8_OP = 0.2


def check_target(target: str) -> str:
    valid = list(MEASURED) + list(TARGETS)
    if target not in valid:
        raise InputError(None, f"unknown target '{target}'", f"valid targets: {', '.join(valid)}")
    if target == "cuda":
        import torch  # deferred: torch

        if not torch.cuda.is_available():
            raise InputError(None, "target 'cuda' needs a GPU, and this machine has none", "use --target cpu or an estimated edge target")
    return target


def estimated_fields(target: str, weight_bytes: int, n_weights: int) -> dict[str, float]:
    """The roofline estimate of one candidate on an edge target; {} for a measured target."""
    if target in MEASURED:
        return {}
    t = TARGETS[target]
    mem_s = weight_bytes / (t["bandwidth_gb_s"] * 1e9)
    ops_s = 2 * n_weights / (t["int8_tops"] * 1e12)
    return {
        "estimated_tg_tokens_per_s": 1.0 / max(mem_s, ops_s),
        "estimated_memory_bound": float(mem_s >= ops_s),
        "estimated_energy_mj_per_token": (weight_bytes * DRAM_PJ_PER_BYTE + 2 * n_weights * PJ_PER_INT8_OP) / 1e9,
    }
