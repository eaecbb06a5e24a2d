"""Acceptance spec files (specs/acceptance.yaml's format) with measurement settings small enough for the tiny
2-layer models the tests build."""

from pathlib import Path

import yaml


def tiny_spec(path: Path) -> Path:
    """Measurement settings small enough for a 2-layer model."""
    path.write_text(yaml.safe_dump({
        "acceptance": {"max_ppl_increase_pct": 2.0, "min_speedup": 1e-6, "min_size_ratio": {4: 1.0, 8: 1.0},
                       "no_generation_failures": False},
        "eval": {"context": 64, "chunks": 2},
        "speed": {"prompt_tokens": 8, "gen_tokens": 4, "repeats": 1},
        "generation": {"prompts": ["Hello there"], "max_new_tokens": 4, "min_new_tokens": 1},
    }))
    return path


def tiny_acceptance(path: Path, max_ppl_pct: float = 0.1, size_ratio: float = 1.0) -> Path:
    """Measurement settings small enough for a 2-layer model; Q4_0 loses ~0.3 % PPL on it, Q8_0 ~0.01 %."""
    path.write_text(yaml.safe_dump({
        "acceptance": {"max_ppl_increase_pct": max_ppl_pct, "min_speedup": 1e-6,  # speed on a 2-layer model is noise; the criterion is exercised, not meaningful
                       "min_size_ratio": {2: size_ratio, 4: size_ratio, 5: size_ratio, 8: size_ratio}, "no_generation_failures": False},
        "eval": {"context": 64, "chunks": 2},
        "speed": {"prompt_tokens": 8, "gen_tokens": 4, "repeats": 1},
        "generation": {"prompts": ["Hello there"], "max_new_tokens": 4, "min_new_tokens": 1},
    }))
    return path


def validation_spec(path, max_ppl=2.0, min_speedup=1.5, chunks=2, max_chunks=None, repeats=3, max_repeats=None, threads=None,
                    sequential=True, first_chunks=4):
    """A spec for validate_quantization with every bar and measurement size a parameter; returns the path as text."""
    path.write_text(yaml.safe_dump({
        "acceptance": {"max_ppl_increase_pct": max_ppl, "min_speedup": min_speedup, "min_size_ratio": {4: 1.0, 8: 1.0},
                       "no_generation_failures": False},
        "eval": {"context": 64, "chunks": chunks, "max_chunks": max_chunks, "sequential": sequential, "first_chunks": first_chunks},
        "speed": {"prompt_tokens": 16, "gen_tokens": 16, "repeats": repeats, "max_repeats": max_repeats, "threads": threads},
        "generation": {"prompts": ["Hello"], "max_new_tokens": 4, "min_new_tokens": 1},
    }))
    return str(path)
