"""llmcad.models.prepare: import a checkpoint into a streamable safetensors directory in a chosen dtype."""
import argparse

import pytest
import torch

from llmcad.errors import ModelLoadError, WeightFileError
from llmcad.models.prepare import add_arguments, prepare, run, verify
from llmcad.streaming.weights import load_index
from tiny_models import build_tiny, load_resident


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_tiny("qwen2", tmp_path_factory.mktemp("src") / "m", num_layers=3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_prepare_writes_every_tensor_in_the_dtype(source, tmp_path, dtype):
    out = prepare(source, tmp_path / "out", dtype)
    index = load_index(out)
    assert {t.dtype for t in index.tensors.values()} == {{"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]}
    assert set(index.tensors) == set(load_index(source).tensors)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    ref = load_resident(source, dtype=getattr(torch, dtype))
    got = load_resident(out, dtype=getattr(torch, dtype))
    ids = torch.tensor([[1, 4, 9, 16]])
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, got(input_ids=ids).logits)


def test_cli_arguments_and_run(source, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(source), "-o", str(tmp_path / "out"), "--dtype", "float32"])
    assert run(args) == 0
    assert "prepared" in capsys.readouterr().out
    assert load_index(tmp_path / "out").num_layers == 3


def test_verify_catches_a_mismatch(source, tmp_path):
    out = prepare(source, tmp_path / "out", "float32")
    other = load_resident(build_tiny("qwen2", tmp_path / "wide", num_layers=4))
    with pytest.raises(WeightFileError, match="missing"):
        verify(out, other)  # a layer the written files lack
    model = load_resident(source)
    with pytest.raises(WeightFileError, match="not bfloat16"):
        verify(out, model, "bfloat16")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(WeightFileError, match="differs"):
        verify(out, model)


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        prepare(tmp_path / "absent", tmp_path / "out")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        prepare(tmp_path / "empty", tmp_path / "out", gguf_file="x.gguf")
    with pytest.raises(ModelLoadError, match="cannot load"):
        prepare(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ModelLoadError, match="dtype"):
        prepare(tmp_path / "empty", tmp_path / "out", dtype="int8")


GGUF = __import__("os").environ.get("LLMCAD_TEST_GGUF")


@pytest.mark.slow
@pytest.mark.skipif(not GGUF, reason="set LLMCAD_TEST_GGUF=/path/model.gguf to import a real GGUF file")
def test_gguf_import_matches_transformers(tmp_path):
    """The prepared directory holds exactly the weights transformers dequantizes from the GGUF."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    gguf = Path(GGUF)
    out = prepare(gguf, tmp_path / "out", "bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16).eval()
    got = load_resident(out, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, got(input_ids=ids).logits)
    assert (out / "tokenizer.json").is_file()
