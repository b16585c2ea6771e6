"""The content digest of large by-value arguments (shared_args.digest_of): equal bytes give
one digest, a change anywhere another, whether a buffer is hashed whole or in two halves."""

import numpy as np
import pytest

from farpool._private import protocol, shared_args


@pytest.mark.parametrize("split_at", [1 << 40, 1024], ids=["whole", "halves"])
def test_equal_bytes_one_digest_a_change_anywhere_another(monkeypatch, split_at):
    monkeypatch.setattr(shared_args, "SPLIT_DIGEST_MIN", split_at)
    base = np.arange(100_000, dtype=np.float64)
    digest = shared_args.digest_of(*protocol.dumps(base))
    assert shared_args.digest_of(*protocol.dumps(base.copy())) == digest
    for where in (0, len(base) // 2 - 1, len(base) // 2, len(base) - 1):
        changed = base.copy()
        changed[where] += 1
        assert shared_args.digest_of(*protocol.dumps(changed)) != digest, f"a change at {where} was not seen"
    assert shared_args.digest_of(*protocol.dumps(base.astype(np.int64))) != digest  # same length, other bytes

