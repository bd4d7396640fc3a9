"""The host-copy spy of the GPU tests sees every way a device tensor's values reach the host.

Checked on the meta device (no GPU needed): each transfer is recorded before the operator runs,
and then fails because meta tensors hold no values.
"""
import pytest
import torch

from host_copy import HostCopySpy

ROWS, COLS = 3, 50


def _paths():
    big = torch.zeros(ROWS, COLS, device="meta")
    one = torch.zeros(1, device="meta")
    host = torch.zeros(ROWS, COLS)
    return {
        ".cpu()": (lambda: big.cpu(), "copy", big),
        '.to("cpu")': (lambda: big.to("cpu"), "copy", big),
        ".to(cpu, non_blocking, dtype)": (lambda: big.to(torch.device("cpu"), torch.float64, non_blocking=True),
                                          "copy", big),
        ".tolist()": (lambda: big.tolist(), "copy", big),
        "host.copy_(device)": (lambda: host.copy_(big), "copy", big),
        ".item()": (lambda: one.item(), "item", one),
        "int()": (lambda: int(one), "item", one),
        "float()": (lambda: float(one), "item", one),
        "bool()": (lambda: bool(one), "item", one),
        "torch.equal": (lambda: torch.equal(big, big), "equal", big),
    }


@pytest.mark.parametrize("path", list(_paths()))
def test_spy_sees_every_device_to_host_path(path):
    call, kind, source = _paths()[path]
    spy = HostCopySpy("meta", min_cols=COLS)
    with spy, pytest.raises((NotImplementedError, RuntimeError)):  # meta tensors have no values to copy
        call()
    assert spy.transfers == [(kind, tuple(source.shape))]
    assert spy.big == ([(kind, tuple(source.shape))] if source.shape[-1] >= COLS else [])


def test_spy_ignores_device_local_work_and_host_tensors():
    spy = HostCopySpy("meta", min_cols=1)
    with spy:
        x = torch.zeros(ROWS, COLS, device="meta")
        (x @ x.T).softmax(-1).to(torch.float16)  # stays on the device
        torch.ones(4).tolist()  # already on the host
        torch.ones(4).to("meta")  # host to device
    assert spy.transfers == []
