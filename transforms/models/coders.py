"""A Beam coder for model inputs that carry arrays (decoded or preprocessed images).

Beam samples the byte size of elements of every PCollection for its metrics -- the first ten, then about ten
per doubling -- and the default pickle coder would pickle megabytes of pixels to measure them. These coders
pickle the element, and estimate its size from its arrays' ``nbytes``.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

import apache_beam as beam


class PickledArraysCoder(beam.coders.Coder):
    """Pickles an element; its size estimate is the sum of the ``nbytes`` of :meth:`arrays`. A subclass names
    the element type (``value_type``) and where its arrays are."""

    value_type: type = object

    def arrays(self, value: Any) -> Iterable[Any]:
        raise NotImplementedError

    def encode(self, value: Any) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> Any:
        return pickle.loads(encoded)

    def estimate_size(self, value: Any) -> int:
        return 64 + sum(int(array.nbytes) for array in self.arrays(value))

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self) -> type:
        return self.value_type
