"""Pure-NumPy twins of every token-tree routine (the reference the C++/CUDA kernels must match)."""
import numpy as np


def depths(parents):
    parents = np.asarray(parents)
    out = np.zeros(len(parents), dtype=np.int32)
    for i in range(1, len(parents)):
        out[i] = out[parents[i]] + 1
    return out


def ancestors_or_self(parents, i):
    chain = []
    while i >= 0:
        chain.append(i)
        i = parents[i]
    return chain


def visible(parents, prefix_len):
    """Boolean [n, prefix_len + n]: True where node i attends to key k."""
    n = len(parents)
    out = np.zeros((n, prefix_len + n), dtype=bool)
    out[:, :prefix_len] = True
    for i in range(n):
        out[i, [prefix_len + a for a in ancestors_or_self(parents, i)]] = True
    return out


def attention_mask(parents, prefix_len, dtype=np.float32):
    return np.where(visible(parents, prefix_len), 0.0, -np.inf).astype(dtype)


def accept(parents, tokens, choice):
    node, accepted = 0, [0]
    while True:
        children = [c for c in range(node + 1, len(parents)) if parents[c] == node and tokens[c] == choice[node]]
        if not children:
            return np.asarray(accepted, dtype=np.int32), int(choice[node])
        node = children[0]
        accepted.append(node)


def commit_indices(accepted, prefix_len):
    return np.concatenate([np.arange(prefix_len), prefix_len + np.asarray(accepted, dtype=np.int64)]).astype(np.int64)


def random_tree(rng, n, max_branch=None):
    """Random valid parent array of n nodes; max_branch bounds how far back a parent may be."""
    parents = np.full(n, -1, dtype=np.int32)
    for i in range(1, n):
        low = 0 if max_branch is None else max(0, i - max_branch)
        parents[i] = rng.integers(low, i)
    return parents


def draft_rows_mask(parents, slots, nodes, prefix_len, ran, dtype=np.float32):
    """Additive mask [B, prefix_len + ran + B] of a batched draft forward: row i (node nodes[i]) sees the
    prefix, the slots of its ancestors (written the slow way: a visibility matrix over all keys) and
    its own new key prefix_len + ran + i."""
    keys = prefix_len + ran + len(nodes)
    seen = np.zeros((len(nodes), keys), dtype=bool)
    seen[:, :prefix_len] = True
    for row, node in enumerate(nodes):
        for a in ancestors_or_self(parents, node)[1:]:
            seen[row, prefix_len + slots[a]] = True
        seen[row, prefix_len + ran + row] = True
    return np.where(seen, 0.0, -np.inf).astype(dtype)
