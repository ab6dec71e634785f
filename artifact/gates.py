"""The accuracy gate a variant must pass before a server runs it.

Measured at export (``training.quantize``, ``training.quantize_openvino``) and written into the
manifest's ``variants``; the server checks the recorded numbers against these limits, so a file
quantised with a looser export flag, or edited by hand, is never served.
"""

from __future__ import annotations

from artifact.manifest import Variant

MIN_COSINE = 0.99  # min embedding cosine vs fp32 on real photos
MAX_KNN_CHANGE = 0.5  # weighted k-NN accuracy change vs fp32, in points (when measured)


def gate_failure(variant: Variant) -> str | None:
    """Why ``variant`` fails its accuracy gate, or ``None`` when it passes."""
    cos = variant.embedding_cosine_min
    if not cos >= MIN_COSINE:  # also catches NaN
        return f"its min embedding cosine vs fp32 is {cos:.5f}, below {MIN_COSINE}"
    change = variant.knn_change
    if change is not None and not abs(change) <= MAX_KNN_CHANGE:
        return f"its k-NN accuracy changes by {change:+.2f} points, more than {MAX_KNN_CHANGE}"
    return None
