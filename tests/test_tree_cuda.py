"""The CUDA tree kernels against their NumPy twins (skipped without a GPU)."""
import numpy as np
import pytest
import torch

import llmcad
from llmcad.spec import tree
import tree_reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and llmcad.build_info()["cuda_available"]
                            and llmcad.build_info()["cuda_compiled"]), reason="needs a CUDA build and a GPU"),
]

SIZES = [1, 2, 7, 63, 64, 65, 257, 1024]


def _trees():
    rng = np.random.default_rng(7)
    for n in SIZES:
        yield ref.random_tree(rng, n)
        yield ref.random_tree(rng, n, max_branch=2)
        yield np.array([-1] + [0] * (n - 1), dtype=np.int32)


@pytest.mark.parametrize("parents", list(_trees()))
def test_cuda_kernels_match_numpy(parents):
    dev = torch.as_tensor(parents, device="cuda")
    np.testing.assert_array_equal(tree.depths(dev).cpu().numpy(), ref.depths(parents))
    for prefix in (0, 5, 64):
        np.testing.assert_array_equal(tree.position_ids(dev, prefix).cpu().numpy(), prefix + ref.depths(parents))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            got = tree.attention_mask(dev, prefix, dtype=dtype, device="cuda").cpu()
            assert torch.equal(got, tree.attention_mask(parents, prefix, dtype=dtype))
        packed = tree.cuda_packed_mask(dev, prefix).cpu().numpy().view(np.uint64)
        np.testing.assert_array_equal(packed, ref.packed_mask(parents, prefix))
    np.testing.assert_array_equal(tree.cuda_paths(dev).cpu().numpy(), ref.paths(parents))
    rng = np.random.default_rng(len(parents))
    tokens = rng.integers(0, 3, size=len(parents)).astype(np.int32)
    choice = rng.integers(0, 3, size=len(parents)).astype(np.int32)
    accepted, bonus = tree.accept(dev, torch.as_tensor(tokens, device="cuda"), torch.as_tensor(choice, device="cuda"))
    want, want_bonus = ref.accept(parents, tokens, choice)
    np.testing.assert_array_equal(accepted.cpu().numpy(), want)
    assert bonus == want_bonus
    np.testing.assert_array_equal(tree.cuda_commit_indices(accepted, 9).cpu().numpy(), ref.commit_indices(want, 9))
