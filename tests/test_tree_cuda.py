"""The CUDA tree kernels against their NumPy twins, and the bindings' checks of what they are given.

The kernel comparisons need a GPU (cuda marker); the binding checks that fail before any device work
(device index, sizes, null and host pointers) run wherever the extension was compiled with CUDA.
"""
import numpy as np
import pytest
import torch

import llmcad
from llmcad._build import _ext
from llmcad.speculative import tree
import tree_reference as ref

HAS_GPU = torch.cuda.is_available() and llmcad.build_info()["cuda_available"] and llmcad.build_info()["cuda_compiled"]
needs_cuda_build = pytest.mark.skipif(not llmcad.build_info()["cuda_compiled"], reason="CUDA not compiled")

SIZES = [1, 2, 7, 63, 64, 65, 257, 1024]


def _trees():
    rng = np.random.default_rng(7)
    for n in SIZES:
        yield ref.random_tree(rng, n)
        yield ref.random_tree(rng, n, max_branch=2)
        yield np.array([-1] + [0] * (n - 1), dtype=np.int32)


@pytest.mark.parametrize("parents", list(_trees()))
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA build and a GPU")
def test_cuda_kernels_match_numpy(parents):
    dev = tree.DeviceTree(parents, "cuda")
    np.testing.assert_array_equal(dev.depths().cpu().numpy(), ref.depths(parents))
    for prefix in (0, 5, 64):
        np.testing.assert_array_equal(dev.position_ids(prefix).cpu().numpy(), prefix + ref.depths(parents))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            got = dev.attention_mask(prefix, dtype).cpu()
            assert torch.equal(got, tree.attention_mask(parents, prefix, dtype=dtype))
    rng = np.random.default_rng(len(parents))
    for _ in range(5):
        tokens = rng.integers(0, 3, size=len(parents)).astype(np.int32)
        choice = rng.integers(0, 3, size=len(parents)).astype(np.int32)
        accepted, bonus, record = dev.accept(tokens, torch.as_tensor(choice, device="cuda"))
        want, want_bonus = ref.accept(parents, tokens, choice)
        np.testing.assert_array_equal(accepted, want)
        assert bonus == want_bonus
        keep = dev.commit_indices(record, len(accepted), 9)
        np.testing.assert_array_equal(keep.cpu().numpy(), ref.commit_indices(want, 9))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_index_is_honoured():
    """A plan and a walk on cuda:1 while cuda:0 is torch's current device: outputs on cuda:1, right."""
    parents = ref.random_tree(np.random.default_rng(2), 65, max_branch=2)
    torch.cuda.set_device(0)
    dev = tree.DeviceTree(parents, "cuda:1")
    mask = dev.attention_mask(7, torch.float16)
    assert mask.device == torch.device("cuda:1")
    assert torch.equal(mask.cpu(), tree.attention_mask(parents, 7, dtype=torch.float16))
    tokens = np.zeros(len(parents), dtype=np.int32)
    accepted, bonus, _ = dev.accept(tokens, torch.zeros(len(parents), dtype=torch.int32, device="cuda:1"))
    np.testing.assert_array_equal(accepted, ref.accept(parents, tokens, tokens)[0])
    assert torch.cuda.current_device() == 0
    with pytest.raises(ValueError, match="device 0, the call runs on device 1"):
        on_zero = torch.zeros(len(parents), dtype=torch.int32, device="cuda:0")
        _ext().cuda_tree_depths(1, on_zero.data_ptr(), 4 * len(parents), dev.parents.data_ptr(),
                                4 * len(parents), 0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA build and a GPU")
def test_bindings_refuse_host_pointers_and_wrong_sizes_on_gpu():
    parents = torch.tensor([-1, 0, 0], dtype=torch.int32, device="cuda")
    out = torch.empty(3, dtype=torch.int64, device="cuda")
    host = torch.empty(3, dtype=torch.int64)
    ext = _ext()
    with pytest.raises(ValueError, match="positions output .* not CUDA memory"):
        ext.cuda_tree_positions(0, parents.data_ptr(), 12, 0, host.data_ptr(), 24, 0)
    with pytest.raises(ValueError, match="positions output .* has 16 bytes, needs 24"):
        ext.cuda_tree_positions(0, parents.data_ptr(), 12, 0, out.data_ptr(), 16, 0)
    with pytest.raises(ValueError, match="tokens .* null pointer"):
        ext.cuda_tree_accept(0, parents.data_ptr(), 12, 0, 12, parents.data_ptr(), 12, out.data_ptr(), 20, 0)


@needs_cuda_build
def test_bindings_check_device_and_sizes_before_any_device_work():
    """Runs with or without a GPU: each of these fails in the binding, naming the problem."""
    ext = _ext()
    count = ext.cuda_device_count()
    with pytest.raises(ValueError, match=f"no CUDA device {count}"):
        ext.cuda_tree_depths(count, 1 << 20, 12, 1 << 21, 12, 0)
    with pytest.raises(ValueError, match="no CUDA device -1"):
        ext.cuda_tree_mask(-1, 1 << 20, 12, 0, 0, 1 << 21, 36, 0)
    with pytest.raises(ValueError, match="no CUDA device"):
        ext.cuda_device_integrated(10_000)
    if count == 0:
        return
    with pytest.raises(ValueError, match="parents buffer has 6 bytes"):
        ext.cuda_tree_depths(0, 1 << 20, 6, 1 << 21, 12, 0)
    with pytest.raises(ValueError, match="parents is a null pointer"):
        ext.cuda_tree_depths(0, 0, 12, 1 << 21, 12, 0)
    with pytest.raises(ValueError, match="prefix length"):
        ext.cuda_tree_positions(0, 1 << 20, 12, -1, 1 << 21, 24, 0)
    with pytest.raises(ValueError, match="mask dtype code"):
        ext.cuda_tree_mask(0, 1 << 20, 12, 0, 7, 1 << 21, 36, 0)
    with pytest.raises(ValueError, match="accepted count 4 outside"):
        ext.cuda_commit_gather_indices(0, 1 << 20, 20, 4, 0, 1 << 21, 32, 0)


def test_device_tree_refuses_device_parents_and_cpu_devices():
    """Parent arrays are validated on the host they come from; a CUDA tensor is refused (checking it
    would copy it back), and so is a DeviceTree off CUDA."""
    with pytest.raises(ValueError, match="DeviceTree needs a CUDA device"):
        tree.DeviceTree([-1, 0], "cpu")
    with pytest.raises(ValueError, match="parent"):
        tree.DeviceTree([0, 0], "cpu")
