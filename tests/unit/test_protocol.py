import pickle
import threading

import numpy as np
import pytest

from farpool._private import protocol


def test_encode_decode_roundtrip():
    frames = protocol.encode("ExecuteTask", (1, b"x", {"a": [1, 2]}), [b"buf"])
    tag, fields, buffers = protocol.decode(frames)
    assert tag == "ExecuteTask"
    assert fields == (1, b"x", {"a": [1, 2]})
    assert buffers == [b"buf"]


@pytest.mark.parametrize("frames, text", [
    ([b"only-one"], "at least 2"),
    ([b"\xff\xfe", pickle.dumps(())], "not text"),
    ([b"NoSuchMessage", pickle.dumps(())], "unknown message tag"),
    ([b"Ping", b"garbage that is not a pickle"], "cannot decode the header"),
    ([b"Ping", pickle.dumps([1, 2])], "expected a tuple"),
])
def test_decode_rejects_garbage(frames, text):
    with pytest.raises(protocol.ProtocolError, match=text):
        protocol.decode(frames)


def test_large_buffers_go_out_of_band_and_small_stay_inline():
    big = np.arange(100_000, dtype=np.float64)
    small = np.arange(10)
    data, bufs = protocol.dumps({"big": big, "small": small})
    assert len(bufs) == 1 and bufs[0].raw().nbytes == big.nbytes
    value = protocol.loads(data, bufs)
    np.testing.assert_array_equal(value["big"], big)
    np.testing.assert_array_equal(value["small"], small)


def test_lambda_falls_back_to_cloudpickle():
    data, _ = protocol.dumps(lambda x: x + 1)
    assert protocol.loads(data)(1) == 2


@pytest.mark.parametrize("value, culprit", [
    (threading.Lock(), "threading lock"),
    ((x for x in range(3)), "generator"),
])
def test_unpicklable_value_names_what_and_why(value, culprit):
    with pytest.raises(protocol.SerializationError) as info:
        protocol.dumps({"arg": value}, what="an argument of f")
    text = str(info.value)
    assert "cannot pickle an argument of f" in text
    assert culprit in text
    assert isinstance(info.value, TypeError)


def test_open_file_hint(tmp_path):
    with open(tmp_path / "x", "w") as f:
        with pytest.raises(protocol.SerializationError, match="open file"):
            protocol.dumps(f)


def test_main_script_importable_detects_the_guard(tmp_path):
    import types
    guarded = tmp_path / "guarded.py"
    guarded.write_text("x = 1\nif __name__ == '__main__':\n    print(x)\n")
    bare = tmp_path / "bare.py"
    bare.write_text("import farpool\nfarpool.init()\n")
    for path, expected in ((guarded, True), (bare, False)):
        module = types.ModuleType("__main__")
        module.__file__ = str(path)
        module.__spec__ = None
        assert protocol.main_script_importable(module) is expected
    interactive = types.ModuleType("__main__")
    assert protocol.main_script_importable(interactive) is False
