"""Analysis results as plain JSON values (numpy arrays, NaN, dataclass results); imports numpy only, so
`visualizations` can use it cheaply."""

from __future__ import annotations

import math

import numpy as np


def to_jsonable(value):
    """numpy arrays and scalars, tuples and dataclass results -> plain JSON values; NaN and inf -> None."""
    if hasattr(value, "to_json") and callable(value.to_json):
        value = value.to_json()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


__all__ = ["to_jsonable"]
