"""Bad checkpoint files get a CheckpointError that names the file (and the tensor), never a raw
numpy/KeyError or a silently misread model. Each corrupt safetensors file here is one the
`safetensors` library itself refuses too, so the two agree on what is corrupt."""

import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file, save_file
import torch
import transformers

import interop
import lorax
from conftest import save_checkpoint

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("llama"), "safetensors")


def copy_of(folder, target):
    target.mkdir(exist_ok=True)
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def header_and_data(path):
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def write_raw_header(path, header_text: str, data: bytes):
    encoded = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def first(header):
    return next(name for name in header if name != "__metadata__")


def same_sized_pair(header):
    tensors = [name for name in header if name != "__metadata__"]
    for a in tensors:
        for b in tensors:
            if a != b and header[a]["shape"] == header[b]["shape"] and header[a]["dtype"] == header[b]["dtype"]:
                return a, b
    raise AssertionError("no two tensors of one shape")


def short_by_four(header):
    start, end = header[first(header)]["data_offsets"]
    header[first(header)]["data_offsets"] = [start, end - 4]


def overlapping(header):
    a, b = same_sized_pair(header)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def reversed_offsets(header):
    header[first(header)]["data_offsets"] = header[first(header)]["data_offsets"][::-1]


def no_dtype(header):
    del header[first(header)]["dtype"]


def shape_text(header):
    header[first(header)]["shape"] = "32,64"


def entry_not_object(header):
    header[first(header)] = 5


# case -> (how the header is changed, what our message says)
CORRUPT_HEADERS = {
    "bytes-do-not-fit-shape": (short_by_four, r"tensor '[\w.]+' of shape \(\d+, \d+\) and dtype F32 needs \d+ bytes, "
                                              r"its data_offsets span \d+"),
    "overlapping-tensors": (overlapping, r"tensors '[\w.]+' and '[\w.]+' overlap"),
    "offsets-reversed": (reversed_offsets, r"tensor '[\w.]+' has data_offsets \[\d+, \d+\]"),
    "no-dtype": (no_dtype, r"tensor '[\w.]+' needs dtype, shape and data_offsets"),
    "shape-not-a-list": (shape_text, r"tensor '[\w.]+' has shape '32,64'"),
    "entry-not-an-object": (entry_not_object, r"tensor '[\w.]+' needs dtype, shape and data_offsets, has 5"),
}


@pytest.mark.parametrize("case", CORRUPT_HEADERS)
def test_corrupt_safetensors_header_names_file_and_tensor(folder, tmp_path, case):
    change, message = CORRUPT_HEADERS[case]
    target = copy_of(folder, tmp_path / case)
    header, data = header_and_data(target / "model.safetensors")
    change(header)
    write_raw_header(target / "model.safetensors", json.dumps(header), data)
    with pytest.raises(Exception):  # the reference refuses the same file
        safetensors.safe_open(target / "model.safetensors", "np")
    with pytest.raises(interop.CheckpointError, match=rf"{target / 'model.safetensors'}: .*{message}"):
        interop.from_pretrained(target, progress=False)


@pytest.mark.parametrize("case", ["list", "repeated-name", "huge-length"])
def test_unreadable_safetensors_header_names_the_file(folder, tmp_path, case):
    target = copy_of(folder, tmp_path / case)
    header, data = header_and_data(target / "model.safetensors")
    if case == "list":
        write_raw_header(target / "model.safetensors", json.dumps([1, 2]), data)
    elif case == "repeated-name":  # JSON allows it, and would keep the last: which bytes are the tensor?
        name = first(header)
        text = json.dumps(header)
        write_raw_header(target / "model.safetensors", text[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}", data)
    else:
        raw = (target / "model.safetensors").read_bytes()
        (target / "model.safetensors").write_bytes(struct.pack("<Q", 2 ** 63) + raw[8:])
    if case != "repeated-name":  # the reference keeps the last entry of a repeated name; we refuse to guess
        with pytest.raises(Exception):
            safetensors.safe_open(target / "model.safetensors", "np")
    with pytest.raises(interop.CheckpointError, match=rf"{target / 'model.safetensors'}: (corrupt|truncated)"):
        interop.from_pretrained(target, progress=False)


def sharded(tmp_path, name):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).eval()
    target = save_checkpoint(model, tmp_path / name, "sharded", "20KB")
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    return target, index


def shard_holding(index, tensor):
    return index["weight_map"][tensor]


@pytest.mark.parametrize("case", ["misplaced", "listed-not-stored", "stored-twice", "outside-the-folder", "empty"])
def test_index_that_does_not_match_its_shards(tmp_path, case):
    target, index = sharded(tmp_path, case)
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    if case == "misplaced":
        weight_map["model.norm.weight"] = next(s for s in shards if s != weight_map["model.norm.weight"])
        message = r"tensor 'model.norm.weight' is listed in \S+, found in \S+"
    elif case == "listed-not-stored":
        weight_map["model.layers.0.extra.weight"] = shards[0]
        message = r"listed but in no shard: model.layers.0.extra.weight"
    elif case == "stored-twice":
        # a copy of the norm in another shard too (safetensors' own writer, not our reader's format)
        name = "model.norm.weight"
        other = target / next(s for s in shards if s != weight_map[name])
        tensors = load_file(other)
        tensors[name] = np.ones(SMALL["hidden_size"], np.float32)
        save_file(tensors, other)
        message = rf"tensor '{name}' is in both \S+ and \S+"
    elif case == "outside-the-folder":
        weight_map["model.norm.weight"] = "../elsewhere.safetensors"
        message = r"shard names must be file names in its folder, not paths: \['../elsewhere.safetensors'\]"
    else:
        index["weight_map"] = {}
        message = r"lists no shards"
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(interop.CheckpointError, match=rf"model.safetensors.index.json.*{message}"):
        interop.from_pretrained(target, progress=False)


def test_legacy_bin_loads_like_transformers(folder, tmp_path):
    """A .bin in torch's pre-1.6 (non-zip) format, which cannot be memory-mapped, still loads."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).eval()
    target = save_checkpoint(model, tmp_path / "legacy", "bin")
    state = torch.load(target / "pytorch_model.bin", weights_only=True)
    torch.save(state, target / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(target).eval()(ids).logits.numpy()
        np.testing.assert_array_equal(theirs, model(ids).logits.numpy())
    ours = np.asarray(interop.from_pretrained(target, progress=False)(jnp.asarray(ids.numpy())))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


BIN_CONTENTS = {
    "nested": (lambda state: {"state_dict": state}, r"entry 'state_dict' is a dict, not a tensor"),
    "with-a-step-count": (lambda state: {**state, "step": 3}, r"entry 'step' is a int, not a tensor"),
    "a-list": (lambda state: list(state.values()), r"holds a list, not a state dict"),
    "complex-weights": (lambda state: {**state, "model.norm.weight": state["model.norm.weight"].to(torch.complex64)},
                        r"tensor 'model.norm.weight' has dtype torch.complex64, which is not supported"),
}


@pytest.mark.parametrize("case", BIN_CONTENTS)
def test_bin_that_is_not_a_flat_state_dict(tmp_path, case):
    change, message = BIN_CONTENTS[case]
    torch.manual_seed(0)
    target = save_checkpoint(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)), tmp_path / case, "bin")
    torch.save(change(torch.load(target / "pytorch_model.bin", weights_only=True)), target / "pytorch_model.bin")
    with pytest.raises(interop.CheckpointError, match=rf"{target / 'pytorch_model.bin'}: {message}"):
        interop.from_pretrained(target, progress=False)


def test_tensor_that_does_not_fit_the_model(folder, tmp_path):
    """Integer weights, and two tensors that would both load into one parameter, are refused by name."""
    tensors = load_file(folder / "model.safetensors")
    for case, change, message in [
        ("integers", {"model.norm.weight": np.ones(SMALL["hidden_size"], np.int64)},
         r"tensor 'model.norm.weight' has dtype int64, the model expects floating-point weights"),
        ("twice", {"norm.weight": tensors["model.norm.weight"]},
         r"tensors '(model\.)?norm.weight' and '(model\.)?norm.weight' both load into the model's 'model.norm.weight'"),
    ]:
        target = copy_of(folder, tmp_path / case)
        save_file({**tensors, **change}, target / "model.safetensors")
        with pytest.raises(interop.CheckpointError, match=message):
            interop.from_pretrained(target, progress=False)


@pytest.mark.parametrize("case", ["a-list", "no-hidden-size", "zero-heads", "size-as-text", "eps-as-text",
                                  "rope-theta-as-text", "quantization-a-list"])
def test_config_json_that_cannot_be_read(folder, tmp_path, case):
    target = copy_of(folder, tmp_path / case)
    config = json.loads((target / "config.json").read_text())
    if case == "a-list":
        config, message = [config], r"a JSON list, not a model config"
    elif case == "no-hidden-size":
        del config["hidden_size"]
        message = r"cannot be read as LlamaForCausalLM's config .*'hidden_size'"
    elif case == "zero-heads":
        config["num_attention_heads"] = 0
        message = r"cannot be read|must be positive integers: \{'num_attention_heads': 0\}"
    elif case == "size-as-text":
        config["hidden_size"] = "32"
        message = r"cannot be read|must be positive integers: \{'hidden_size': '32'\}"
    elif case == "eps-as-text":  # before, it loaded and the forward pass failed adding a str to a tracer
        config["rms_norm_eps"] = "1e-6"
        message = r"must be numbers: \{'rms_norm_eps': '1e-6'\}"
    elif case == "rope-theta-as-text":
        config["rope_theta"] = "10000"
        config.pop("rope_parameters", None)
        message = r"cannot be read|must be numbers: \{'rope_theta': '10000'\}"
    else:
        config["quantization_config"] = [{"load_in_4bit": True}]
        message = r"quantization_config is a list, not an object"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(interop.CheckpointError, match=message) as raised:
        interop.from_pretrained(target, progress=False)
    assert "config.json" in str(raised.value)


def test_repo_id_in_the_hub_cache_loads_as_transformers_and_peft_resolve_it(folder, tmp_path, monkeypatch):
    """"org/name" with no such folder is looked up in the Hugging Face cache (the layout downloads
    leave: models--org--name/refs/main and snapshots/<commit>/), offline, as transformers and peft
    resolve it: the same model and adapter load; a repo id that is not cached says where it looked."""
    import huggingface_hub
    import peft

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the env var is too late
    monkeypatch.chdir(tmp_path)  # so that "org/..." is not a folder relative to where the tests run

    def cache_repo(repo_id: str, files: dict[str, bytes]):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        for name, data in files.items():
            (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
            (repo / "snapshots" / commit / name).write_bytes(data)

    cache_repo("org/tiny-llama", {p.name: p.read_bytes() for p in folder.iterdir()})
    torch.manual_seed(1)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    cache_repo("org/tiny-lora", {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()})

    ids = torch.randint(0, SMALL["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    theirs = transformers.AutoModelForCausalLM.from_pretrained("org/tiny-llama", cache_dir=cache).eval()
    theirs_adapted = peft.PeftModel.from_pretrained(theirs, "org/tiny-lora", cache_dir=cache).eval()
    with torch.no_grad():
        expected = theirs_adapted(ids).logits.numpy()
    graphdef, params = lorax.split(interop.from_pretrained("org/tiny-llama", progress=False))
    adapted = interop.load_adapter("org/tiny-lora", params)
    ours = np.asarray(lorax.apply(graphdef, adapted, jnp.asarray(ids.numpy())))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)

    with pytest.raises(interop.CheckpointError, match=r"no folder 'org/absent', and it is not a repo id in the "
                                                        r"Hugging Face cache .*hf download org/absent"):
        interop.from_pretrained("org/absent", progress=False)


def test_architectures_as_one_string_reads_as_transformers_reads_it(folder, tmp_path):
    """"architectures": "LlamaForCausalLM" (a string, not a list): transformers loads it (by
    model_type); so do we, as that one name, with its logits."""
    target = copy_of(folder, tmp_path / "string")
    config = json.loads((target / "config.json").read_text())
    config["architectures"] = "LlamaForCausalLM"
    (target / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(target).eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        expected = theirs(ids).logits.numpy()
    ours = lorax.apply(*lorax.split(interop.from_pretrained(target, progress=False)), jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=1e-4)
