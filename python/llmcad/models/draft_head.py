"""The draft's output layer packed at load time (``draft_head``: "auto", "float", "int8" or "int4").

A draft forward on a CPU reads its weights once, so it costs about their bytes: the 0.5B Qwen2.5 draft's
151,936-row output layer is as large as all its int8 decoder linears together. Packing that layer with
the weight-only schemes of :mod:`llmcad.models.quantize` (int8 per row, int4 per group of inputs) cuts
those bytes to a half or a quarter; torch's kernels then compute it (:class:`QuantizedLinear`). The
packed layer is made from the loaded float one, a block of rows at a time, so no file changes and a
pruned layer (:mod:`llmcad.models.vocab`) is packed after it is cut. A head tied to the input
embeddings packs them too (:class:`PackedEmbedding`: a lookup dequantizes the rows it gathers; int8
shares the head's codes, int4 keeps a copy in the stored layout, its kernel's being blocked across
rows); an untied float head is replaced and untied embeddings stay float, as do the embeddings of a
pruned head (lookups need every row).

Only the draft's proposals change: the target verifies every token, so output stays exact.

"auto" packs the head like the draft's decoder linears (a draft from ``prepare --quantize int8`` gets an
int8 head) on a CPU, where the kernels read the packed bytes; a float draft, or one on a GPU (whose int8
path widens the weight on every call), keeps its float head. int4 needs in_features divisible by one of
torch's group sizes and out_features by 16; "auto" falls back to int8 where it cannot.

Part of llmcad.models: may use llmcad.streaming; must not import llmcad.speculative, llmcad.bench or the engine.
"""
from __future__ import annotations

import torch

from llmcad.errors import ModelLoadError
from llmcad.models.quantize import dequantize, quantize_int4, quantize_int8
from llmcad.models.vocab import untie
from llmcad.streaming.quantized import GROUP_SIZES, SCHEMES, QuantizedLinear

CHOICES = ("auto", "float", *SCHEMES)
_BLOCK_ROWS = 8192  # rows quantized at a time: float32 temporaries of 8192 x hidden, not of the whole layer
_INT4_ROWS = 16  # torch's int4 kernels want out_features divisible by this


def parse_draft_head(value, name: str = "draft_head") -> str:
    """One of :data:`CHOICES` (None: "auto"); ValueError naming ``name`` for anything else."""
    if value is None:
        return "auto"
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in CHOICES:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(CHOICES)}")
    return text


def int4_group_size(in_features: int, out_features: int) -> int | None:
    """The largest of torch's int4 group sizes dividing ``in_features`` (None: int4 cannot hold the layer)."""
    if out_features % _INT4_ROWS:
        return None
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if g <= 128 and in_features % g == 0), None)


def resolve(requested: str, draft_scheme: str | None, shape: tuple, device) -> tuple:
    """(scheme or None for float, group size or None) for a head of ``shape`` [out, in] on ``device``,
    ``draft_scheme`` being the draft's decoder linears' scheme (None: float). ModelLoadError when an
    explicit int4 cannot hold the layer."""
    requested = parse_draft_head(requested)
    rows, cols = shape
    if requested == "auto":
        if draft_scheme is None or torch.device(device).type != "cpu":
            return None, None
        requested = draft_scheme if draft_scheme != "int4" or int4_group_size(cols, rows) else "int8"
    if requested == "float":
        return None, None
    if requested == "int8":
        return "int8", None
    group = int4_group_size(cols, rows)
    if group is None:
        raise ModelLoadError(f"draft_head='int4': the draft's output layer [{rows}, {cols}] cannot be int4 (torch's "
                             f"int4 kernels need out_features divisible by {_INT4_ROWS} and in_features by one of "
                             f"{', '.join(map(str, GROUP_SIZES))}); use draft_head='int8'")
    return "int4", group


def packed_bytes(rows: int, cols: int, scheme: str, group_size: int | None, dtype) -> int:
    """Bytes of a packed [rows, cols] layer: codes, then scales (and zeros) in ``dtype``."""
    item = torch.empty((), dtype=dtype).element_size()
    if scheme == "int8":
        return rows * cols + rows * item
    return rows * cols // 2 + 2 * rows * (cols // group_size) * item


def packed_head(head: torch.nn.Linear, scheme: str, group_size: int | None, *, with_table: bool = False):
    """``head``'s weight packed by ``scheme`` into a QuantizedLinear on its device, in the kernel's layout.
    ``with_table``: also return a :class:`PackedEmbedding` of the same codes (for a tied head), else None."""
    weight = head.weight.detach()
    rows, cols = weight.shape
    packed = QuantizedLinear(cols, rows, bias=head.bias is not None, scheme=scheme, group_size=group_size,
                             dtype=weight.dtype, device=weight.device)
    for start in range(0, rows, _BLOCK_ROWS):
        block = weight[start:start + _BLOCK_ROWS]
        parts = quantize_int8(block, weight.dtype) if scheme == "int8" else quantize_int4(block, group_size,
                                                                                          weight.dtype)
        for name, values in parts.items():
            getattr(packed, name).data[start:start + len(block)] = values
    if head.bias is not None:
        packed.bias.data.copy_(head.bias.detach())
    table = None
    if with_table:  # int8 codes are the kernel's layout too: shared; int4's is blocked across rows: a copy
        parts = ("qweight", "scales") if scheme == "int8" else ("qweight", "scales", "zeros")
        table = PackedEmbedding({p: getattr(packed, p) if scheme == "int8" else
                                 torch.nn.Parameter(getattr(packed, p).detach().clone(), requires_grad=False)
                                 for p in parts}, scheme, group_size, cols)
    packed.pack()
    return packed, table


class PackedEmbedding(torch.nn.Module):
    """Input embeddings held as packed codes (:mod:`llmcad.models.quantize`'s stored layout); a lookup
    dequantizes the rows it gathers. ``weight`` is a stand-in of the right shape, dtype and device (no
    values: it expands one element) for callers that read only those."""

    def __init__(self, parameters: dict, scheme: str, group_size: int | None, embedding_dim: int):
        super().__init__()
        for name, param in parameters.items():
            self.register_parameter(name, param)
        self.scheme, self.group_size, self.embedding_dim = scheme, group_size, embedding_dim
        self.num_embeddings = self.qweight.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.scales.new_zeros(()).expand(self.num_embeddings, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        gathered = {name: p.index_select(0, flat) for name, p in self.named_parameters()}
        rows = dequantize(gathered, self.scheme, self.group_size)  # float32 [len(flat), embedding_dim]
        return rows.to(self.scales.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme}{group}"


def pack_output_layer(model, requested: str, draft_scheme: str | None) -> str:
    """Replace ``model.lm_head`` by its packed copy as :func:`resolve` decides; returns the head's scheme
    ("float" when it stays). A head tied to the input embeddings packs them too (:class:`PackedEmbedding`:
    int8 shares the head's codes, int4 keeps its own copy in the stored layout)."""
    head = model.get_output_embeddings()
    if not hasattr(model, "lm_head") or head is not model.lm_head:
        if parse_draft_head(requested) in ("auto", "float"):
            return "float"
        raise ModelLoadError(f"{type(model).__name__}: a packed draft head needs the output layer at lm_head")
    if isinstance(head, QuantizedLinear):
        return head.scheme
    if not isinstance(head, torch.nn.Linear):
        raise ModelLoadError(f"{type(model).__name__}: its output layer is a {type(head).__name__}, not an "
                             "nn.Linear; use draft_head='float'")
    scheme, group = resolve(requested, draft_scheme, tuple(head.weight.shape), head.weight.device)
    if scheme is None:
        return "float"
    embeddings = model.get_input_embeddings()
    tied = isinstance(embeddings, torch.nn.Embedding) and embeddings.weight is head.weight and head.bias is None
    model.lm_head, table = packed_head(head, scheme, group, with_table=tied)
    untie(model.config)
    if table is not None:
        model.set_input_embeddings(table)
    return scheme

