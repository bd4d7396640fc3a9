"""Token-tree planning: thin, validating wrappers over the C++/CUDA kernels in ``llmcad._C``.

A tree of n nodes is its parent array in creation order: ``parents[0] == -1`` (the root, the last
committed token) and ``0 <= parents[i] < i``. Keys are ``prefix_len`` cached tokens followed by the n
tree nodes. CPU inputs (lists, NumPy arrays, CPU tensors) run the C++ kernels; CUDA tensors run the
CUDA kernels on the current torch stream and return CUDA tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmcad._build import _ext

_MASK_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def _is_cuda(x) -> bool:
    return getattr(x, "is_cuda", False)


def _int32_vector(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.size and (array.max() > np.iinfo(np.int32).max or array.min() < np.iinfo(np.int32).min):
        raise ValueError(f"{name} has values outside int32")
    return np.ascontiguousarray(array, dtype=np.int32)


def _check_prefix(prefix_len) -> int:
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, np.integer)):
        raise ValueError(f"prefix_len must be an int, got {type(prefix_len).__name__}")
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    return int(prefix_len)


def validate_parents(parents) -> np.ndarray:
    """Return ``parents`` as a contiguous int32 array; ValueError naming the first violation."""
    array = _int32_vector(parents, "parents")
    _ext().validate_tree(array)
    return array


def depths(parents):
    """Depth of every node (root 0): int32 [n]."""
    if _is_cuda(parents):
        return _cuda_depths_or_positions(parents, None)
    return _ext().tree_depths(validate_parents(parents))


def position_ids(parents, prefix_len: int):
    """Position id of every node, ``prefix_len + depth``: int64 [n]."""
    prefix_len = _check_prefix(prefix_len)
    if _is_cuda(parents):
        return _cuda_depths_or_positions(parents, prefix_len)
    return _ext().tree_positions(validate_parents(parents), prefix_len)


def attention_mask(parents, prefix_len: int, dtype=None, device="cpu"):
    """Additive tree mask ``[1, 1, n, prefix_len + n]``: 0 where a node sees a key (every prefix key,
    its ancestors and itself), -inf elsewhere. ``dtype`` is torch.float32 (default), float16 or bfloat16."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    code = _MASK_DTYPE_CODES.get(str(dtype).replace("torch.", ""))
    if code is None:
        raise ValueError(f"mask dtype must be float32, float16 or bfloat16, got {dtype}")
    prefix_len = _check_prefix(prefix_len)
    device = torch.device(device)
    if device.type == "cuda" or _is_cuda(parents):
        return _cuda_mask(parents, prefix_len, dtype, code, device)
    array = validate_parents(parents)
    n = array.shape[0]
    out = torch.empty((1, 1, n, prefix_len + n), dtype=dtype)
    _ext().tree_mask_into(array, prefix_len, code, out.data_ptr(), out.numel() * out.element_size())
    return out if device.type == "cpu" else out.to(device)


def packed_mask(parents, prefix_len: int) -> np.ndarray:
    """The tree mask bit-packed: uint64 [n, ceil((prefix_len + n) / 64)], bit k of word w = key 64w+k."""
    return _ext().tree_mask_packed(validate_parents(parents), _check_prefix(prefix_len))


def paths(parents) -> np.ndarray:
    """Root-to-leaf node paths, leaves in creation order: int32 [num_leaves, max_depth + 1], -1 padded."""
    return _ext().tree_paths(validate_parents(parents))


def accept(parents, tokens, choice):
    """Acceptance walk shared by greedy and sampled verification.

    From the root, at node u descend to the first-created child whose token equals ``choice[u]``
    (the target's argmax or sample at u); stop when none does. Returns ``(accepted, bonus)``:
    the accepted node ids (int32, root first) and the bonus token ``choice[last accepted]``.
    """
    if _is_cuda(parents):
        return _cuda_accept(parents, tokens, choice)
    array = validate_parents(parents)
    token_array = _int32_vector(tokens, "tokens")
    choice_array = _int32_vector(choice, "choice")
    if not token_array.shape == choice_array.shape == array.shape:
        raise ValueError(
            f"parents, tokens and choice must have the same length, got "
            f"{array.shape[0]}, {token_array.shape[0]}, {choice_array.shape[0]}"
        )
    accepted, bonus = _ext().tree_accept(array, token_array, choice_array)
    return accepted, int(bonus)


def commit_indices(accepted, prefix_len: int) -> np.ndarray:
    """KV slots kept by a commit: ``[0, prefix_len)`` then ``prefix_len + accepted[j]``: int64."""
    array = _int32_vector(accepted, "accepted")
    if array.size == 0 or array[0] != 0:
        raise ValueError("accepted must start with the root (node 0)")
    return _ext().commit_gather_indices(array, _check_prefix(prefix_len))


@dataclass
class TreePlan:
    """Everything a tree forward needs: ``position_ids`` [1, n] int64 and ``mask`` [1, 1, n, P+n]."""

    depths: object
    position_ids: object
    mask: object


def plan(parents, prefix_len: int, dtype=None, device="cpu") -> TreePlan:
    """Depths, position ids and the additive mask of a tree, on ``device``."""
    import torch

    if torch.device(device).type == "cuda" and not _is_cuda(parents):
        parents = torch.as_tensor(validate_parents(parents), device=device)
    node_depths = depths(parents)
    positions = position_ids(parents, prefix_len)
    mask = attention_mask(parents, prefix_len, dtype=dtype, device=device)
    positions = torch.as_tensor(positions).to(device).view(1, -1)
    return TreePlan(depths=node_depths, position_ids=positions, mask=mask)


# ---------------------------------------------------------------- CUDA paths
def _cuda_parents(parents):
    """Validate on a host copy (one small D2H of n int32), return the device int32 tensor."""
    import torch

    validate_parents(parents.detach().cpu())
    return parents.detach().to(torch.int32).contiguous()


def _stream(device) -> int:
    import torch

    return torch.cuda.current_stream(device).cuda_stream


def _cuda_depths_or_positions(parents, prefix_len):
    import torch

    device_parents = _cuda_parents(parents)
    n = device_parents.numel()
    stream = _stream(device_parents.device)
    if prefix_len is None:
        out = torch.empty(n, dtype=torch.int32, device=device_parents.device)
        _ext().cuda_tree_depths(device_parents.data_ptr(), n, out.data_ptr(), stream)
    else:
        out = torch.empty(n, dtype=torch.int64, device=device_parents.device)
        _ext().cuda_tree_positions(device_parents.data_ptr(), n, prefix_len, out.data_ptr(), stream)
    return out


def _cuda_mask(parents, prefix_len, dtype, code, device):
    import torch

    if not _is_cuda(parents):
        parents = torch.as_tensor(validate_parents(parents), device=device)
    device_parents = _cuda_parents(parents)
    n = device_parents.numel()
    out = torch.empty((1, 1, n, prefix_len + n), dtype=dtype, device=device_parents.device)
    _ext().cuda_tree_mask(device_parents.data_ptr(), n, prefix_len, code, out.data_ptr(), _stream(out.device))
    return out


def cuda_packed_mask(parents, prefix_len: int):
    """CUDA twin of :func:`packed_mask`; returns a CUDA int64 tensor holding the uint64 bit patterns."""
    import torch

    device_parents = _cuda_parents(parents)
    n = device_parents.numel()
    words = (_check_prefix(prefix_len) + n + 63) // 64
    out = torch.empty((n, words), dtype=torch.int64, device=device_parents.device)
    _ext().cuda_tree_mask_packed(device_parents.data_ptr(), n, prefix_len, out.data_ptr(), _stream(out.device))
    return out


def cuda_paths(parents):
    """CUDA twin of :func:`paths` (leaf list and width computed from a host copy of parents)."""
    import torch

    host = validate_parents(parents.detach().cpu())
    has_child = np.zeros(host.shape[0], dtype=bool)
    has_child[host[1:]] = True
    leaves = torch.as_tensor(np.flatnonzero(~has_child).astype(np.int32), device=parents.device)
    width = int(_ext().tree_depths(host).max()) + 1
    device_parents = _cuda_parents(parents)
    out = torch.empty((leaves.numel(), width), dtype=torch.int32, device=parents.device)
    _ext().cuda_tree_paths(device_parents.data_ptr(), host.shape[0], leaves.data_ptr(), leaves.numel(),
                           width - 1, out.data_ptr(), _stream(out.device))
    return out


def _cuda_accept(parents, tokens, choice):
    """Runs the walk on the device; only the accepted ids and the bonus come back to the host."""
    import torch

    device_parents = _cuda_parents(parents)
    n = device_parents.numel()
    tokens = tokens.to(device=device_parents.device, dtype=torch.int32).contiguous()
    choice = choice.to(device=device_parents.device, dtype=torch.int32).contiguous()
    if tokens.numel() != n or choice.numel() != n:
        raise ValueError("parents, tokens and choice must have the same length")
    accepted = torch.empty(n, dtype=torch.int32, device=device_parents.device)
    count = torch.empty(1, dtype=torch.int64, device=device_parents.device)
    bonus = torch.empty(1, dtype=torch.int32, device=device_parents.device)
    _ext().cuda_tree_accept(device_parents.data_ptr(), tokens.data_ptr(), choice.data_ptr(), n,
                            accepted.data_ptr(), count.data_ptr(), bonus.data_ptr(), _stream(accepted.device))
    num = int(count.item())
    return accepted[:num], int(bonus.item())


def cuda_commit_indices(accepted, prefix_len: int):
    """CUDA twin of :func:`commit_indices` for a device ``accepted`` vector (int32, root first)."""
    import torch

    accepted = accepted.to(torch.int32).contiguous()
    prefix_len = _check_prefix(prefix_len)
    count = torch.tensor([accepted.numel()], dtype=torch.int64, device=accepted.device)
    out = torch.empty(prefix_len + accepted.numel(), dtype=torch.int64, device=accepted.device)
    _ext().cuda_commit_gather_indices(accepted.data_ptr(), count.data_ptr(), accepted.numel(), prefix_len,
                                      out.data_ptr(), _stream(out.device))
    return out
