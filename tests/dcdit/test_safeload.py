"""The one loading rule for weights from outside (dcdit.safeload): weights-only or safetensors, a flat dict of
tensors, every expected name with its shape; a crafted pickle is refused without running."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dcdit.errors import DCDiTError
from dcdit.safeload import load_state_dict_file


class CodeRunner:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


EXPECTED = {"a.weight": (2, 3), "a.bias": (2,)}


def test_a_matching_file_loads_in_either_format(tmp_path):
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(2)}
    torch.save(state, tmp_path / "w.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        loaded = load_state_dict_file(tmp_path / name, expected=EXPECTED)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("content, says", [
    ({"a.weight": torch.zeros(2, 3)}, "missing 'a.bias'"),
    ({"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2), "b": torch.zeros(1)}, "unexpected 'b'"),
    ({"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(2)}, r"a.weight has shape \(3, 2\), expected \(2, 3\)"),
    ([torch.zeros(1)], "not a test state dict"),
    ({"a.weight": 1.0}, "not a test state dict"),
])
def test_wrong_content_is_one_line_naming_the_file(tmp_path, content, says):
    torch.save(content, tmp_path / "w.pt")
    with pytest.raises(DCDiTError, match=says) as err:
        load_state_dict_file(tmp_path / "w.pt", expected=EXPECTED, what="test")
    assert str(tmp_path / "w.pt") in str(err.value) and "\n" not in str(err.value)


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"a.weight": CodeRunner(marker)}, tmp_path / "w.pt")
    with pytest.raises(DCDiTError, match="pickled code"):
        load_state_dict_file(tmp_path / "w.pt")
    assert not marker.exists()


@pytest.mark.parametrize("name, data", [("w.pt", b"\x80\x02junk"), ("w.safetensors", b"\x10\x00\x00\x00junk"),
                                        ("w.pt", b"")])
def test_damaged_files_are_one_line_errors(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DCDiTError) as err:
        load_state_dict_file(tmp_path / name)
    assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DCDiTError, match="not found"):
        load_state_dict_file(tmp_path / "absent.pt")
