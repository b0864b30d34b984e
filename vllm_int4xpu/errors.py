"""The project's one exception type for bad input.

Every check on checkpoints, tensors and configuration raises :class:`Int4FormatError`
naming *where* (file and tensor), *what was expected* and *what was found*, so a user can
fix the checkpoint instead of debugging a wrong answer.
"""

from __future__ import annotations


_UNSET = object()


class Int4FormatError(ValueError):
    """Bad int4 input: wrong shape/dtype/config, missing tensor, out-of-range values."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None,
                 expected: object = _UNSET, found: object = _UNSET):
        self.file = file
        self.tensor = tensor
        self._raw_expected, self._raw_found = expected, found
        self.expected = None if expected is _UNSET else expected
        self.found = None if found is _UNSET else found
        parts = [message]
        if file is not None:
            parts.append(f"file={file}")
        if tensor is not None:
            parts.append(f"tensor={tensor}")
        if expected is not _UNSET:
            parts.append(f"expected={expected}")
        if found is not _UNSET:
            parts.append(f"found={'nothing' if found is None else found}")
        super().__init__("; ".join(parts))

    def with_context(self, *, file: str | None = None, tensor: str | None = None) -> "Int4FormatError":
        """Return a copy that also names the file/tensor (keeps the original facts)."""
        base = str(self.args[0]).split("; ")[0]
        return Int4FormatError(base, file=file or self.file, tensor=tensor or self.tensor,
                               expected=self._raw_expected, found=self._raw_found)
