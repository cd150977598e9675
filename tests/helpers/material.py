"""The real Lab-3 material in ../shared and what is known about it (from ../shared/README.md)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
BD_WEIGHTS = SHARED / "models" / "lab3_bd_weights.h5"
PRUNED_FULL = SHARED / "models" / "lab3_pruned_2pct_full.h5"
CLEAN_IMAGE = SHARED / "images" / "clean_test_1.png"
POISONED_IMAGE = SHARED / "images" / "sunglass_poisoned_1.png"
N = 1283  # GoodNet's label for flagged inputs
#: conv_3 channels zeroed in lab3_pruned_2pct_full.h5.
PRUNED_2PCT_CHANNELS = [0, 1, 2, 3, 6, 9, 12, 13, 14, 15, 17, *range(19, 28), *range(29, 35),
                        *range(36, 46), *range(47, 52), 53, 55, 58, 59]
