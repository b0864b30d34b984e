"""The project's one exception type for bad input.

Every check on checkpoints, tensors and configuration raises :class:`Int4FormatError`
naming *where* (file and tensor), *what was expected* and *what was found*, so a user can
fix the checkpoint instead of debugging a wrong answer.
"""

from __future__ import annotations


class Int4FormatError(ValueError):
    """Bad int4 input: wrong shape/dtype/config, missing tensor, out-of-range values."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None,
                 expected: object = None, found: object = None):
        self.file = file
        self.tensor = tensor
        self.expected = expected
        self.found = found
        parts = [message]
        if file is not None:
            parts.append(f"file={file}")
        if tensor is not None:
            parts.append(f"tensor={tensor}")
        if expected is not None:
            parts.append(f"expected={expected}")
        if found is not None:
            parts.append(f"found={found}")
        super().__init__("; ".join(parts))

    def with_context(self, *, file: str | None = None, tensor: str | None = None) -> "Int4FormatError":
        """Return a copy that also names the file/tensor (keeps the original facts)."""
        base = str(self.args[0]).split("; ")[0]
        return Int4FormatError(base, file=file or self.file, tensor=tensor or self.tensor,
                               expected=self.expected, found=self.found)
