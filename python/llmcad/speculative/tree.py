"""Token-tree planning: thin, validating wrappers over the C++/CUDA kernels in ``llmcad._C``.

A tree of n nodes is its parent array in creation order: ``parents[0] == -1`` (the root, the last
committed token) and ``0 <= parents[i] < i``. Keys are ``prefix_len`` cached tokens followed by the n
tree nodes. Parent arrays are host data (lists, NumPy arrays, CPU tensors), validated on the host; the
C++ kernels plan on the CPU. For a CUDA device, :class:`DeviceTree` uploads a validated parent array
once (no host sync) and runs the CUDA kernels on the current torch stream; nothing comes back to the
host except the acceptance walk's few ids, in one small copy.

Part of llmcad.speculative: must not import llmcad.streaming, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmcad._build import _ext

_MASK_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def _is_cuda(x) -> bool:
    return getattr(x, "is_cuda", False)


def _int32_vector(values, name: str) -> np.ndarray:
    if _is_cuda(values):
        raise ValueError(f"{name} must be host data (a list, NumPy array or CPU tensor), got a CUDA tensor: "
                         "checking it would copy it back to the host")
    if hasattr(values, "detach"):
        values = values.detach().numpy()
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
    return _ext().tree_depths(validate_parents(parents))


def position_ids(parents, prefix_len: int):
    """Position id of every node, ``prefix_len + depth``: int64 [n]."""
    return _ext().tree_positions(validate_parents(parents), _check_prefix(prefix_len))


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
    if device.type == "cuda":
        return DeviceTree(parents, device).attention_mask(prefix_len, dtype)
    array = validate_parents(parents)
    n = array.shape[0]
    out = torch.empty((1, 1, n, prefix_len + n), dtype=dtype)
    _ext().tree_mask_into(array, prefix_len, code, out.data_ptr(), out.numel() * out.element_size())
    return out if device.type == "cpu" else out.to(device)


def accept(parents, tokens, choice):
    """Acceptance walk shared by greedy and sampled verification.

    From the root, at node u descend to the first-created child whose token equals ``choice[u]``
    (the target's argmax or sample at u); stop when none does. Returns ``(accepted, bonus)``:
    the accepted node ids (int32, root first) and the bonus token ``choice[last accepted]``.
    A CUDA ``choice`` runs the walk on its device (see :meth:`DeviceTree.accept`).
    """
    if _is_cuda(choice):
        accepted, bonus, _ = DeviceTree(parents, choice.device).accept(tokens, choice)
        return accepted, bonus
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
    """Depths, position ids and the additive mask of a tree, on ``device`` (one upload on CUDA)."""
    import torch

    if torch.device(device).type == "cuda":
        return DeviceTree(parents, device).plan(prefix_len, dtype)
    positions = torch.as_tensor(position_ids(parents, prefix_len)).view(1, -1)
    return TreePlan(depths=depths(parents), position_ids=positions,
                    mask=attention_mask(parents, prefix_len, dtype=dtype))


# ---------------------------------------------------------------- CUDA
def host_to_device(array, device):
    """A host array as a tensor on ``device`` with no host sync: on CUDA a pinned staging copy and a
    non-blocking upload on the current stream (torch's caching host allocator keeps the staging buffer
    until the copy has run). CPU devices get the array's own tensor."""
    import torch

    host = torch.from_numpy(np.ascontiguousarray(array))
    device = torch.device(device)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


class DeviceTree:
    """A tree's parent array validated on the host and uploaded once to a CUDA ``device``; its plan
    and acceptance walk run there (current torch stream), device index passed explicitly."""

    def __init__(self, parents, device):
        import torch

        self.host = validate_parents(parents)
        self.n = int(self.host.shape[0])
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"DeviceTree needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.parents = host_to_device(self.host, self.device)

    def same_tree(self, parents) -> bool:
        """Whether host ``parents`` is this tree (so its upload can be reused)."""
        return len(parents) == self.n and np.array_equal(np.asarray(parents), self.host)

    def _stream(self) -> int:
        import torch

        return torch.cuda.current_stream(self.device).cuda_stream

    def depths(self):
        import torch

        out = torch.empty(self.n, dtype=torch.int32, device=self.device)
        _ext().cuda_tree_depths(self.device.index, self.parents.data_ptr(), _nbytes(self.parents),
                                out.data_ptr(), _nbytes(out), self._stream())
        return out

    def position_ids(self, prefix_len: int):
        """int64 [n] on the device."""
        import torch

        prefix_len = _check_prefix(prefix_len)
        out = torch.empty(self.n, dtype=torch.int64, device=self.device)
        _ext().cuda_tree_positions(self.device.index, self.parents.data_ptr(), _nbytes(self.parents), prefix_len,
                                   out.data_ptr(), _nbytes(out), self._stream())
        return out

    def attention_mask(self, prefix_len: int, dtype=None):
        """The additive mask [1, 1, n, prefix_len + n] (as :func:`attention_mask`) on the device."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        code = _MASK_DTYPE_CODES.get(str(dtype).replace("torch.", ""))
        if code is None:
            raise ValueError(f"mask dtype must be float32, float16 or bfloat16, got {dtype}")
        prefix_len = _check_prefix(prefix_len)
        out = torch.empty((1, 1, self.n, prefix_len + self.n), dtype=dtype, device=self.device)
        _ext().cuda_tree_mask(self.device.index, self.parents.data_ptr(), _nbytes(self.parents), prefix_len, code,
                              out.data_ptr(), _nbytes(out), self._stream())
        return out

    def plan(self, prefix_len: int, dtype=None) -> TreePlan:
        return TreePlan(depths=self.depths(), position_ids=self.position_ids(prefix_len).view(1, -1),
                        mask=self.attention_mask(prefix_len, dtype))

    def accept(self, tokens, choice):
        """The acceptance walk on the device: host ``tokens`` [n] (uploaded without a sync) and the
        target's ``choice`` [n] on this device. Returns ``(accepted, bonus, record)``: the accepted
        ids (int32 NumPy, root first) and the bonus from ONE small device-to-host copy, and the device
        accept record (int32 [n + 2]: count, bonus, ids) for :meth:`commit_indices`."""
        import torch

        token_array = _int32_vector(tokens, "tokens")
        if token_array.shape[0] != self.n or choice.dim() != 1 or choice.shape[0] != self.n:
            raise ValueError(f"parents, tokens and choice must have the same length, got {self.n}, "
                             f"{token_array.shape[0]}, {tuple(choice.shape)}")
        if choice.device != self.device:
            raise ValueError(f"choice is on {choice.device}, the tree on {self.device}")
        device_tokens = host_to_device(token_array, self.device)
        device_choice = choice.to(torch.int32).contiguous()
        record = torch.empty(self.n + 2, dtype=torch.int32, device=self.device)
        _ext().cuda_tree_accept(self.device.index, self.parents.data_ptr(), _nbytes(self.parents),
                                device_tokens.data_ptr(), _nbytes(device_tokens), device_choice.data_ptr(),
                                _nbytes(device_choice), record.data_ptr(), _nbytes(record), self._stream())
        host = record.cpu().numpy()  # the round's one device-to-host copy of the walk
        count = int(host[0])
        return host[2:2 + count].copy(), int(host[1]), record

    def commit_indices(self, record, count: int, prefix_len: int):
        """KV slots kept by a commit (as :func:`commit_indices`), int64 [prefix_len + count] made on the
        device from an accept ``record``; ``count`` is the record's count (known on the host)."""
        import torch

        prefix_len = _check_prefix(prefix_len)
        out = torch.empty(prefix_len + int(count), dtype=torch.int64, device=self.device)
        _ext().cuda_commit_gather_indices(self.device.index, record.data_ptr(), _nbytes(record), int(count),
                                          prefix_len, out.data_ptr(), _nbytes(out), self._stream())
        return out
