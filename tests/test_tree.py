"""The C++ tree kernels against their NumPy twins, at awkward sizes, plus metamorphic cases."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcad.speculative import tree
import tree_reference as ref

SIZES = [1, 2, 7, 63, 64, 65, 257]
PREFIXES = [0, 1, 5, 64, 100]


def trees():
    rng = np.random.default_rng(1234)
    for n in SIZES:
        yield f"random{n}", ref.random_tree(rng, n)
        yield f"bushy{n}", ref.random_tree(rng, n, max_branch=3)
        yield f"chain{n}", np.arange(-1, n - 1, dtype=np.int32)
        yield f"star{n}", np.array([-1] + [0] * (n - 1), dtype=np.int32)


TREES = list(trees())
IDS = [name for name, _ in TREES]


@pytest.mark.parametrize("name,parents", TREES, ids=IDS)
def test_depths_and_positions(name, parents):
    np.testing.assert_array_equal(tree.depths(parents), ref.depths(parents))
    for prefix in PREFIXES:
        np.testing.assert_array_equal(tree.position_ids(parents, prefix), prefix + ref.depths(parents))
        assert tree.position_ids(parents, prefix).dtype == np.int64


@pytest.mark.parametrize("name,parents", TREES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_mask_matches_reference_bits(name, parents, dtype):
    for prefix in (0, 3, 65):
        got = tree.attention_mask(parents, prefix, dtype=dtype)
        n = len(parents)
        assert got.shape == (1, 1, n, prefix + n) and got.dtype == dtype
        want = torch.from_numpy(ref.attention_mask(parents, prefix)).to(dtype)
        # exact bit equality, also for the fp16/bf16 -inf patterns
        assert torch.equal(got[0, 0].view(torch.int16 if dtype != torch.float32 else torch.int32),
                           want.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("n", SIZES)
def test_chain_mask_is_lower_triangular(n):
    chain = np.arange(-1, n - 1, dtype=np.int32)
    got = tree.attention_mask(chain, 0)[0, 0].numpy() == 0
    np.testing.assert_array_equal(got, np.tril(np.ones((n, n), dtype=bool)))


@pytest.mark.parametrize("n", SIZES)
def test_star_mask_is_identity_plus_root_column(n):
    star = np.array([-1] + [0] * (n - 1), dtype=np.int32)
    got = tree.attention_mask(star, 0)[0, 0].numpy() == 0
    want = np.eye(n, dtype=bool)
    want[:, 0] = True
    np.testing.assert_array_equal(got, want)


def _choices_following(parents, tokens, rng, follow_prob):
    """Target choices that agree with some child with probability follow_prob."""
    choice = rng.integers(0, 50, size=len(parents)).astype(np.int32)
    for u in range(len(parents)):
        children = np.flatnonzero(parents == u)
        if len(children) and rng.random() < follow_prob:
            choice[u] = tokens[rng.choice(children)]
    return choice


@pytest.mark.parametrize("name,parents", TREES, ids=IDS)
@pytest.mark.parametrize("follow_prob", [0.0, 0.5, 1.0])
def test_accept_and_commit(name, parents, follow_prob):
    rng = np.random.default_rng(len(parents))
    tokens = rng.integers(0, 50, size=len(parents)).astype(np.int32)
    choice = _choices_following(parents, tokens, rng, follow_prob)
    accepted, bonus = tree.accept(parents, tokens, choice)
    want_accepted, want_bonus = ref.accept(parents, tokens, choice)
    np.testing.assert_array_equal(accepted, want_accepted)
    assert bonus == want_bonus
    for prefix in (0, 9):
        np.testing.assert_array_equal(tree.commit_indices(accepted, prefix), ref.commit_indices(accepted, prefix))


def test_accept_full_chain_and_duplicate_children():
    chain = np.arange(-1, 5, dtype=np.int32)
    tokens = np.array([7, 1, 2, 3, 4, 5], dtype=np.int32)
    choice = np.array([1, 2, 3, 4, 5, 9], dtype=np.int32)
    accepted, bonus = tree.accept(chain, tokens, choice)
    assert accepted.tolist() == [0, 1, 2, 3, 4, 5] and bonus == 9
    # two children with the same token: the first created wins
    parents = np.array([-1, 0, 0, 2], dtype=np.int32)
    accepted, bonus = tree.accept(parents, [0, 4, 4, 6], [4, 8, 6, 1])
    assert accepted.tolist() == [0, 1] and bonus == 8


@pytest.mark.parametrize(
    "parents,message",
    [
        ([], "at least one node"),
        ([0], "parents\\[0\\] must be -1"),
        ([-1, 1], "parents\\[1\\] = 1"),
        ([-1, 0, 5], "parents\\[2\\] = 5"),
        ([-1, 0, -1], "second root"),
        ([-1, -3], "parents\\[1\\] = -3"),
    ],
)
def test_invalid_trees_name_the_problem(parents, message):
    with pytest.raises(ValueError, match=message):
        tree.depths(np.asarray(parents, dtype=np.int32))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        tree.position_ids([-1, 0], -1)
    with pytest.raises(ValueError, match="integers"):
        tree.depths(np.array([-1.0, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        tree.depths(np.array([[-1, 0]]))
    with pytest.raises(ValueError, match="mask dtype"):
        tree.attention_mask([-1, 0], 0, dtype=torch.int32)
    with pytest.raises(ValueError, match="same length"):
        tree.accept([-1, 0], [1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="root"):
        tree.commit_indices([1, 2], 3)


def test_plan_bundles_positions_and_mask():
    parents = [-1, 0, 0, 1]
    plan = tree.plan(parents, 4)
    assert plan.position_ids.tolist() == [[4, 5, 5, 6]]
    assert torch.equal(plan.mask, tree.attention_mask(parents, 4))


@st.composite
def tree_and_prefix(draw):
    n = draw(st.integers(1, 80))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    return np.asarray(parents, dtype=np.int32), draw(st.integers(0, 70))


@settings(max_examples=60, deadline=None)
@given(tree_and_prefix(), st.integers(0, 2**31 - 1))
def test_property_every_routine_matches_numpy(case, seed):
    parents, prefix = case
    rng = np.random.default_rng(seed)
    np.testing.assert_array_equal(tree.position_ids(parents, prefix), prefix + ref.depths(parents))
    np.testing.assert_array_equal(tree.attention_mask(parents, prefix)[0, 0].numpy(),
                                  ref.attention_mask(parents, prefix))
    tokens = rng.integers(0, 4, size=len(parents)).astype(np.int32)
    choice = rng.integers(0, 4, size=len(parents)).astype(np.int32)
    accepted, bonus = tree.accept(parents, tokens, choice)
    want, want_bonus = ref.accept(parents, tokens, choice)
    np.testing.assert_array_equal(accepted, want)
    assert bonus == want_bonus
    np.testing.assert_array_equal(tree.commit_indices(accepted, prefix), ref.commit_indices(accepted, prefix))


@st.composite
def tree_with_following_choices(draw):
    """A random tree, its tokens, and target choices that follow some child with a drawn probability, so
    accepted paths of every length (down to the deepest leaf) occur."""
    parents, prefix = draw(tree_and_prefix())
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    tokens = rng.integers(0, 6, size=len(parents)).astype(np.int32)
    choice = _choices_following(parents, tokens, rng, draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])))
    return parents, prefix, tokens, choice


@settings(max_examples=60, deadline=None)
@given(tree_with_following_choices())
def test_property_accept_commit_and_plan_match_numpy(case):
    parents, prefix, tokens, choice = case
    np.testing.assert_array_equal(tree.depths(parents), ref.depths(parents))
    accepted, bonus = tree.accept(parents, tokens, choice)
    want, want_bonus = ref.accept(parents, tokens, choice)
    np.testing.assert_array_equal(accepted, want)
    assert bonus == want_bonus
    np.testing.assert_array_equal(tree.commit_indices(accepted, prefix), ref.commit_indices(accepted, prefix))
    plan = tree.plan(parents, prefix)
    np.testing.assert_array_equal(plan.position_ids[0].numpy(), prefix + ref.depths(parents))
    np.testing.assert_array_equal(plan.mask[0, 0].numpy(), ref.attention_mask(parents, prefix))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(-3, 90), min_size=0, max_size=40))
def test_property_any_parent_array_is_valid_or_a_value_error(parents):
    """Random (mostly invalid) parent arrays: every routine either agrees with NumPy or raises ValueError;
    nothing crashes."""
    valid = len(parents) >= 1 and parents[0] == -1 and all(0 <= p < i for i, p in enumerate(parents) if i)
    if not valid:
        for routine in (tree.depths, lambda p: tree.position_ids(p, 3), lambda p: tree.attention_mask(p, 3)):
            with pytest.raises(ValueError):
                routine(parents)
        return
    np.testing.assert_array_equal(tree.depths(parents), ref.depths(np.asarray(parents, dtype=np.int32)))


class _CountingHead(torch.nn.Linear):
    """An output layer that counts the rows it ran on."""

    rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return super().forward(x)


def _lazy_case(n, seed, vocab=11):
    """A tree whose tokens are the argmax of its own rows' logits along a long path, so the walk goes
    deep; values favour that path (informative) or the opposite (misleading)."""
    from llmcad.speculative.draft import DraftTree
    from llmcad.speculative.forward import RowLogits

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    parents = ref.random_tree(rng, n, max_branch=3)
    head = _CountingHead(8, vocab, bias=False)
    hidden = torch.randn(n, 8, generator=g)
    choice = head(hidden).argmax(-1).numpy().astype(np.int32)
    head.rows = 0
    tokens = rng.integers(0, vocab, n).astype(np.int32)
    node, path = 0, {0}
    while True:  # the first child of each node on the path carries its parent's choice
        kids = [c for c in range(n) if parents[c] == node]
        if not kids:
            break
        tokens[kids[0]] = choice[node]
        for other in kids[1:]:
            tokens[other] = (choice[node] + 1 + other) % vocab
        node = kids[0]
        path.add(node)
    verified = DraftTree.rooted(int(tokens[0]))
    for u in range(1, n):  # parents come before children: ids stay the same
        verified.add(int(parents[u]), int(tokens[u]), 0.5, 0.9 if u in path else 0.01)
    return RowLogits(head, hidden, chunk_rows=5), head, verified, path


class _HostVerifier:
    def accept(self, parents, tokens, choice):
        return tree.accept(parents, tokens, choice)


@pytest.mark.parametrize("n", [1, 17, 64, 257])
@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("values_follow_path", [True, False])
def test_lazy_walk_equals_choosing_every_row(n, do_sample, values_follow_path):
    from llmcad.speculative.verify import TargetChooser, choose_and_accept

    logits, head, verified, path = _lazy_case(n, seed=n)
    if not values_follow_path:
        verified.value = [1.0] + [0.01 if u in path else 0.9 for u in range(1, n)]
    positions = list(range(100, 100 + n))
    chooser = TargetChooser(do_sample=do_sample, temperature=0.7, seed=3)
    want = tree.accept(verified.parents, verified.tokens, chooser.choose(logits, positions))
    head.rows = 0
    got = choose_and_accept(chooser, _HostVerifier(), logits, verified, positions)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1]
    if n > 64 and values_follow_path and not do_sample:
        assert len(want[0]) > 3  # the walk went deep, yet the head ran on far fewer rows than the tree's
        assert head.rows < n // 2


def test_lazy_walk_runs_the_head_once_on_every_likely_node(monkeypatch):
    """Nodes whose path value is at least HEAD_ROW_VALUE join the first batch, however few tokens the tree
    expects to accept: here the path's nodes rank below every other node, so a batch sized by the expected
    length alone misses them and the walk needs more head batches."""
    from llmcad.speculative.forward import RowLogits
    from llmcad.speculative.verify import HEAD_ROW_VALUE, TargetChooser, choose_and_accept

    logits, head, verified, path = _lazy_case(257, seed=5)
    assert len(path) > 3
    verified.value = [1.0] + [HEAD_ROW_VALUE if u in path else 0.05 for u in range(1, 257)]
    batches = []
    select = RowLogits.select
    monkeypatch.setattr(RowLogits, "select", lambda self, rows: (batches.append(len(rows)), select(self, rows))[1])
    chooser = TargetChooser()
    want = tree.accept(verified.parents, verified.tokens, chooser.choose(logits.full()))
    got = choose_and_accept(chooser, _HostVerifier(), logits, verified, list(range(257)))
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1]
    assert batches == [257]
