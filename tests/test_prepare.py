"""llmcad.models.prepare: import a checkpoint into a streamable safetensors directory in a chosen dtype."""
import argparse
import struct
from pathlib import Path

import pytest
import torch

from llmcad.errors import ModelLoadError, WeightFileError
from llmcad.models.prepare import add_arguments, prepare, run, verify
from llmcad.streaming.weights import load_index
from tiny_models import build_tiny, load_resident
from child_cli import child_env


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


# ---------------------------------------------------------------- nothing destroyed, nothing stranded
def _siblings(out):
    return sorted(p.name for p in out.parent.glob(f".{out.name}.llmcad-*"))


def test_refuses_the_source_or_a_directory_inside_or_around_it(source, tmp_path, capfd):
    from llmcad import cli

    before = {p.name: p.stat().st_mtime_ns for p in source.iterdir()}
    for out, pattern in [(source, "is the source directory or lies inside it"),
                         (source / "sub", "is the source directory or lies inside it"),
                         (source.parent, "holds the source")]:
        with pytest.raises(ModelLoadError, match=pattern):
            prepare(source, out, "float32", force=True)
        capfd.readouterr()
        assert cli.main(["prepare", str(source), "-o", str(out), "--force"]) == 2
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and pattern in err, err
    assert {p.name: p.stat().st_mtime_ns for p in source.iterdir()} == before
    assert not (source / "sub").exists()


def test_non_empty_output_needs_force_then_is_replaced_whole(source, tmp_path, capfd):
    from llmcad import cli
    from llmcad.errors import OutputError

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("{}")  # a stale sharded checkpoint's index
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"directory is not empty; pass --force"):
        prepare(source, out, "float32")
    capfd.readouterr()
    assert cli.main(["prepare", str(source), "-o", str(out)]) == 2
    assert "directory is not empty" in capfd.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    prepare(source, out, "float32", force=True)
    assert not (out / "notes.txt").exists() and not (out / "model.safetensors.index.json").exists()
    assert load_index(out).num_layers == 3 and _siblings(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_index(prepare(source, empty, "float32")).num_layers == 3  # an empty directory is fine


def _before_swap(monkeypatch, action):
    """Run ``action()`` once prepare has written and verified its output, right before the swap (after
    its output checks)."""
    from llmcad.models import prepare as prepare_module

    real = prepare_module._swap_into_place

    def act_then_swap(*args, **kwargs):
        action()
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_swap_into_place", act_then_swap)


def test_output_that_appears_while_preparing_is_never_replaced(source, tmp_path, monkeypatch):
    from llmcad.errors import OutputError

    out = tmp_path / "out"

    def someone_writes():
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    _before_swap(monkeypatch, someone_writes)
    with pytest.raises(OutputError, match=r"a non-empty directory appeared there while prepare ran; left it as it is"):
        prepare(source, out, "float32")
    assert (out / "notes.txt").read_text() == "mine" and _siblings(out) == []


def test_force_replaces_only_the_directory_it_checked(source, tmp_path, monkeypatch):
    from llmcad.errors import OutputError

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("checked")

    def someone_swaps():
        out.rename(tmp_path / "moved")
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    _before_swap(monkeypatch, someone_swaps)
    with pytest.raises(OutputError, match=r"was replaced by another directory while prepare ran; left it as it is"):
        prepare(source, out, "float32", force=True)
    assert (out / "notes.txt").read_text() == "mine" and _siblings(out) == []


def test_failure_while_writing_leaves_the_old_output_and_no_temporary(source, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    out = prepare(source, tmp_path / "out", "float32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, out, "bfloat16", force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _siblings(out) == []
    with pytest.raises(KeyboardInterrupt):
        prepare(source, tmp_path / "new", "bfloat16")
    assert not (tmp_path / "new").exists() and _siblings(tmp_path / "new") == []


@pytest.mark.parametrize("code,strerror", [(28, "No space left on device"), (13, "Permission denied")])
def test_disk_full_or_permission_denied_is_one_line(source, tmp_path, monkeypatch, capfd, code, strerror):
    from transformers import PreTrainedTokenizerBase

    from llmcad import cli

    def failing(self, directory, *args, **kwargs):
        raise OSError(code, strerror, str(directory))

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", failing)
    capfd.readouterr()
    assert cli.main(["prepare", str(source), "-o", str(tmp_path / "out")]) == 2
    lines = capfd.readouterr().err.replace("\r", "\n").splitlines()  # tqdm's progress lines first
    assert lines[-1] == f"llmcad: error: cannot write {tmp_path / 'out'}: {strerror}"
    assert sum("error" in line for line in lines) == 1
    assert not (tmp_path / "out").exists() and _siblings(tmp_path / "out") == []


def test_sigterm_removes_the_temporary_and_sigkill_leftovers_are_swept(source, tmp_path):
    """SIGTERM while the weights are being written: exit 143, no temporary left; a leftover of a killed
    run (its pid gone) is removed by the next run, and an old output it had moved aside comes back."""
    import signal
    import subprocess
    import sys
    import time


    out = tmp_path / "out"
    slow = ("import sys, time\n"
            "from transformers import PreTrainedTokenizerBase\n"
            "save = PreTrainedTokenizerBase.save_pretrained\n"
            "def slow(self, d, *a, **k):\n"
            "    save(self, d, *a, **k); print('written', flush=True); time.sleep(60)\n"
            "PreTrainedTokenizerBase.save_pretrained = slow\n"
            "from llmcad.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = child_env()
    proc = subprocess.Popen([sys.executable, "-c", slow, "prepare", str(source), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        assert proc.stdout.readline().strip() == b"written"
        assert _siblings(out) == [f".out.llmcad-tmp-{proc.pid}"]
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert proc.wait(timeout=60) == 143 and time.monotonic() - t0 < 30  # interpreter teardown, loaded CI
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert _siblings(out) == [] and not out.exists()
    # what SIGKILL would leave: a temporary, and an old output moved aside (pids that no longer exist)
    dead = proc.pid
    (tmp_path / f".out.llmcad-tmp-{dead}").mkdir()
    (tmp_path / f".out.llmcad-tmp-{dead}" / "model.safetensors").write_bytes(b"x" * 1000)
    old = prepare(source, tmp_path / f".out.llmcad-old-{dead}", "float32")
    prepare(source, tmp_path / "other", "float32")  # a run for another output leaves these alone
    assert len(_siblings(out)) == 2
    with pytest.raises(Exception):
        prepare(source, out, "int8")  # refused before anything is written
    assert _siblings(out) == [f".out.llmcad-old-{dead}", f".out.llmcad-tmp-{dead}"]
    prepare(source, out, "float32", force=True)
    assert _siblings(out) == [] and load_index(out).num_layers == 3 and not old.exists()


def test_gguf_file_source_is_the_file_not_its_directory(tmp_path, monkeypatch):
    """README's ``llmcad prepare model.gguf -o models/target`` where the GGUF lies: the output is beside
    the source file, not inside it (this one is not a valid GGUF: the error is about the file)."""
    monkeypatch.chdir(tmp_path)
    Path("model.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1))
    with pytest.raises(ModelLoadError, match=r"model\.gguf: not a valid GGUF file \(truncated or corrupt"):
        prepare("model.gguf", "models/target")
    with pytest.raises(ModelLoadError, match=r"holds the source"):
        prepare("model.gguf", ".", force=True)  # replacing the GGUF's own directory would delete it
    with pytest.raises(ModelLoadError, match=r"--out model\.gguf: is the source or lies inside it"):
        prepare("model.gguf", "model.gguf", force=True)


@pytest.mark.parametrize("data", [b"", b"GGUF", b"XXXX" + bytes(40), b"GGUF" + struct.pack("<IQQ", 99, 0, 0),
                                  b"GGUF" + struct.pack("<IQQ", 3, 2**60, 2**60)],
                         ids=["empty", "magic-only", "not-gguf", "version-99", "huge-counts"])
def test_malformed_gguf_is_one_line_naming_the_file(tmp_path, capfd, data):
    from llmcad import cli

    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(data)
    capfd.readouterr()
    assert cli.main(["prepare", str(gguf), "-o", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert err.startswith(f"llmcad: error: {gguf}: not a valid GGUF file (") and err.count("\n") == 1, err
    assert "internal error" not in err and "unpack_from" not in err


def _written_by_old_loader(gguf, out, dtype=torch.bfloat16):
    """What prepare wrote before converting tensor by tensor: transformers' whole-model GGUF load, saved."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = dtype
    model.save_pretrained(out)
    return model


def _convert(gguf, out, dtype=torch.bfloat16, **kw):
    from llmcad.models import convert
    from llmcad.models.prepare import _save_config

    source = convert.gguf_source(gguf, dtype, **kw)
    out.mkdir()
    digests = convert.write_source(source, out)
    _save_config(source.model, out, None)
    convert.verify_digests(out, digests)
    return source


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_gguf_converted_tensor_by_tensor_equals_the_whole_model_load(tmp_path, arch):
    import json

    from safetensors.torch import load_file

    from tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "m.gguf", num_layers=3, arch=arch)
    _written_by_old_loader(gguf, tmp_path / "old")
    _convert(gguf, tmp_path / "new")
    old, new = load_file(tmp_path / "old" / "model.safetensors"), load_file(tmp_path / "new" / "model.safetensors")
    assert sorted(old) == sorted(new) and "lm_head.weight" in new
    for name in old:
        assert old[name].dtype == new[name].dtype == torch.bfloat16 and torch.equal(old[name], new[name]), name
    for name in ("config.json", "generation_config.json"):
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("old", "new"))
        assert a == b, name
    index = load_index(tmp_path / "new")
    assert all(len(index.layer_ranges(i).ranges) == 1 for i in range(3))


def test_tie_embeddings_stores_the_output_once_and_ties_it(tmp_path):
    from safetensors.torch import load_file

    from tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "m.gguf")
    ref = _written_by_old_loader(gguf, tmp_path / "old")
    source = _convert(gguf, tmp_path / "new", tie_embeddings=True)
    assert "output" in source.note
    written = load_file(tmp_path / "new" / "model.safetensors")
    assert "lm_head.weight" not in written
    assert torch.equal(written["model.embed_tokens.weight"], ref.lm_head.weight)
    model = load_resident(tmp_path / "new", dtype=torch.bfloat16)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    assert load_index(tmp_path / "new").tied == {"lm_head.weight": "model.embed_tokens.weight"}
    with pytest.raises(ModelLoadError, match="no separate output"):
        from llmcad.models import convert

        convert.gguf_source(write_tiny_gguf(tmp_path / "t.gguf", tied=True), torch.bfloat16, tie_embeddings=True)


_PEAK_CHILD = """
import sys, torch
from pathlib import Path
from llmcad.models import convert
source = convert.gguf_source(Path(sys.argv[1]), torch.bfloat16)
Path(sys.argv[2]).mkdir()
convert.write_source(source, Path(sys.argv[2]))
print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
"""


def test_conversion_peak_memory_does_not_grow_with_the_model(tmp_path):
    """Peak RSS (VmHWM, kB) of a child converting a GGUF: a model 4x larger (400 MB more in float32)
    peaks no higher, within noise (one slice of rows at a time, the mapped file's pages dropped). Both
    models' large tensors span several slices, so the smaller one already holds a slice's worth."""
    import subprocess
    import sys

    from tiny_gguf import write_tiny_gguf

    rows = {"medium": 65536, "large": 262144}  # embedding and output rows, 256 wide (64 and 256 MiB in fp32)
    grown_fp32 = 2 * (rows["large"] - rows["medium"]) * 256 * 4 // 1024  # kB
    peaks = []
    for name, vocab in rows.items():
        gguf = write_tiny_gguf(tmp_path / f"{name}.gguf", num_layers=2, vocab=vocab, hidden=256, ffn=256)
        out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(gguf), str(tmp_path / name)],
                             capture_output=True, text=True, timeout=600, check=True)
        peaks.append(int(out.stdout.split()[-1]))
        gguf.unlink()
    assert peaks[1] - peaks[0] < grown_fp32 // 10, (peaks, grown_fp32)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_quantized_tensor_by_tensor_equals_the_whole_model_quantization(source, tmp_path, scheme, group):
    from safetensors.torch import load_file

    from llmcad.models import quantize as quant

    out = prepare(source, tmp_path / "out", "bfloat16", quantize=scheme, group_size=group)
    model = load_resident(source, dtype=torch.bfloat16)
    state, record = quant.quantized_state(model, scheme, group, model.dtype)
    written = load_file(out / "model.safetensors")
    want = quant.drop_tied(model, state)
    assert sorted(written) == sorted(want)
    for name, tensor in want.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    quant.verify_written(out, want, record)


def test_a_gguf_source_names_its_quantization_types_as_the_file_does(tmp_path):
    """The requantization note's type names come from the source already read, equal to a fresh read."""
    from llmcad.models import convert
    from llmcad.models.quantize import gguf_tensor_types
    from tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "m.gguf")
    source = convert.gguf_source(gguf, torch.bfloat16)
    try:
        assert source.tensor_types and list(source.tensor_types) == gguf_tensor_types(gguf)
    finally:
        source.close()
