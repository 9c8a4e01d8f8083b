"""The frozen text encoder (models/text_encoder.py) on tiny random encoders of every supported
class, built at test time (tests/text_fixtures.py): class from `architectures`, refusals,
masks that keep padding out, fingerprints, the describe/check record, the tiny demo encoder."""
import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.text_encoder import (ENCODERS, FrozenTextEncoder, TextWarning, check_text_encoder,
                                 make_tiny_text_encoder)
from tests.text_fixtures import CLIP_POSITIONS, HIDDEN, MAX_LENGTH, PROJECTION, WORDS, t5_tokenizer
from utils.config import TextEncoderConfig
from utils.errors import ConfigError, MissingFileError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTION = "a red square moving left on a black background"
LONGER = "a blue circle moving up and a green triangle moving down"  # 11 words: fits CLIP's 16


@pytest.fixture(scope="module")
def loaded(text_encoders):
    """{kind: FrozenTextEncoder} for the encoder folders (loaded once)."""
    return {k: FrozenTextEncoder.from_pretrained(text_encoders[k])
            for k in ("t5", "umt5", "clip", "clip_projection", "t5_full")}


@pytest.mark.parametrize("kind, cls, pooled", [
    ("t5", "T5EncoderModel", None), ("umt5", "UMT5EncoderModel", None),
    ("clip", "CLIPTextModel", HIDDEN), ("clip_projection", "CLIPTextModelWithProjection", PROJECTION),
    ("t5_full", "T5EncoderModel", None)])
def test_class_comes_from_architectures(loaded, kind, cls, pooled):
    enc = loaded[kind]
    assert enc.class_name == cls and type(enc.model).__name__ == cls
    tokens, mask, pooled_out = enc.encode([CAPTION, "a dog"])
    L = MAX_LENGTH if kind.startswith(("t5", "umt5")) else CLIP_POSITIONS  # the tokenizer's model_max_length
    assert enc.max_length == L
    assert tokens.shape == (2, L, HIDDEN) and mask.shape == (2, L) and mask.dtype == torch.bool
    assert (pooled_out is None) == (pooled is None)
    if pooled:
        assert pooled_out.shape == (2, pooled) and enc.pooled_size == pooled
    specials = 1 if cls.startswith(("T5", "UMT5")) else 2  # </s>, or <|startoftext|> ... <|endoftext|>
    assert mask.sum(1).tolist() == [len(CAPTION.split()) + specials, 2 + specials]


@pytest.mark.parametrize("kind", ["t5", "umt5", "clip", "clip_projection"])
def test_padding_is_never_attended(loaded, kind):
    """A caption's encoding is the same alone, beside a longer one (padded further), and in
    another order; padding positions are zero and masked out."""
    enc = loaded[kind]
    alone = enc.encode([CAPTION])
    batch = enc.encode([LONGER, CAPTION, "a dog"])
    n = int(alone.mask[0].sum())
    assert torch.equal(alone.mask[0], batch.mask[1])
    assert alone.mask[0, :n].all() and not alone.mask[0, n:].any()  # a prefix
    torch.testing.assert_close(batch.tokens[1], alone.tokens[0], atol=1e-5, rtol=1e-5)
    assert (batch.tokens[2][~batch.mask[2]] == 0).all()
    if alone.pooled is not None:
        torch.testing.assert_close(batch.pooled[1], alone.pooled[0], atol=1e-5, rtol=1e-5)
    # ... and the encoder does read the words: another caption differs
    assert (batch.tokens[0, :n] - alone.tokens[0, :n]).abs().max() > 1e-3


def test_frozen(loaded):
    enc = loaded["t5"]
    enc.train()
    assert not enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())


def test_pipeline_folder_and_subfolder(text_encoders):
    pipe = text_encoders["pipeline"]
    t5 = FrozenTextEncoder.from_pretrained(pipe)
    assert t5.class_name == "T5EncoderModel" and t5.path == os.path.join(pipe, "text_encoder")
    assert "tokenizer/" in t5.found
    clip = FrozenTextEncoder.from_config(TextEncoderConfig(path=pipe, subfolder="text_encoder_2", max_length=8))
    assert clip.class_name == "CLIPTextModelWithProjection" and clip.max_length == 8
    assert "tokenizer_2/" in clip.found and clip.encode(["a dog"]).tokens.shape == (1, 8, HIDDEN)


def test_unsupported_class_is_refused_naming_both(text_encoders, tmp_path):
    with pytest.raises(UserError) as e:
        FrozenTextEncoder.from_pretrained(text_encoders["unsupported"])
    assert "BertModel" in str(e.value) and all(name in str(e.value) for name in ENCODERS)
    folder = tmp_path / "no_arch"
    shutil.copytree(text_encoders["unsupported"], folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UserError, match="no 'architectures' entry"):
        FrozenTextEncoder.from_pretrained(str(folder))


def test_bad_folders_are_named(text_encoders, tmp_path):
    with pytest.raises(MissingFileError, match="text encoder directory not found: .*nowhere"):
        FrozenTextEncoder.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        FrozenTextEncoder.from_pretrained(str(tmp_path / "file.bin"))
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(text_encoders["t5"], no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(MissingFileError, match="no tokenizer files"):
        FrozenTextEncoder.from_pretrained(str(no_tok))
    with pytest.raises(MissingFileError, match="text_encoder.subfolder = 'text_encoder_3'"):
        FrozenTextEncoder.from_pretrained(text_encoders["pipeline"], subfolder="text_encoder_3")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(text_encoders["t5"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match=f"could not load the text encoder in {corrupt}"):
        FrozenTextEncoder.from_pretrained(str(corrupt))
    with pytest.raises(ConfigError, match="text_encoder.path is not set"):
        FrozenTextEncoder.from_config(TextEncoderConfig())


def test_max_length(text_encoders):
    with pytest.raises(ConfigError, match=f"text_encoder.max_length = 40: .* has {CLIP_POSITIONS} positions"):
        FrozenTextEncoder.from_pretrained(text_encoders["clip"], max_length=40)
    enc = FrozenTextEncoder.from_pretrained(text_encoders["t5"], max_length=4)
    with pytest.warns(TextWarning, match="1 caption.* longer than text_encoder.max_length = 4"):
        out = enc.encode([CAPTION, "a dog"])
    assert out.tokens.shape[1] == 4 and out.mask.sum(1).tolist() == [4, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["a dog"])  # short captions: no warning


def test_fingerprint_follows_weights_config_and_tokenizer(text_encoders, loaded, tmp_path):
    base = loaded["t5"]
    moved = tmp_path / "moved"
    shutil.copytree(text_encoders["t5"], moved)
    same = FrozenTextEncoder.from_pretrained(str(moved))
    assert same.fingerprint == base.fingerprint  # the folder's location is not part of it
    check_text_encoder(base.describe(), same, "ckpt.pth")  # accepted
    bf16 = FrozenTextEncoder.from_pretrained(str(moved), dtype="bf16")
    assert bf16.fingerprint == base.fingerprint and bf16.describe()["dtype"] == "bfloat16"

    weights = tmp_path / "weights"
    shutil.copytree(text_encoders["t5"], weights)
    state = load_file(str(weights / "model.safetensors"))
    name = sorted(state)[-1]
    state[name] = state[name] + 1e-3
    save_file(state, str(weights / "model.safetensors"), metadata={"format": "pt"})
    changed = FrozenTextEncoder.from_pretrained(str(weights))
    assert changed.fingerprint != base.fingerprint
    assert changed.parts["tokenizer"] == base.parts["tokenizer"] and changed.parts["weights"] != base.parts["weights"]
    with pytest.raises(UserError, match="text encoder mismatch: ckpt.pth .*: its weights differ"):
        check_text_encoder(base.describe(), changed, "ckpt.pth")

    tok = tmp_path / "tokenizer"
    shutil.copytree(text_encoders["t5"], tok)
    for f in os.listdir(tok):
        if f.startswith("tokenizer"):
            os.remove(tok / f)
    t5_tokenizer(WORDS + ["cat"]).save_pretrained(str(tok))  # one more word: other token ids
    other = FrozenTextEncoder.from_pretrained(str(tok))
    assert other.parts["weights"] == base.parts["weights"] and other.fingerprint != base.fingerprint
    with pytest.raises(UserError, match="its tokenizer differ"):
        check_text_encoder(base.describe(), other, "ckpt.pth")

    with pytest.raises(UserError, match="its weights, config and tokenizer differ"):
        check_text_encoder(base.describe(), loaded["umt5"], "ckpt.pth")
    short = FrozenTextEncoder.from_pretrained(text_encoders["t5"], max_length=8)
    with pytest.raises(UserError, match=f"set text_encoder.max_length = {MAX_LENGTH}"):
        check_text_encoder(base.describe(), short, "ckpt.pth")


def test_describe_is_a_plain_record(loaded):
    record = loaded["clip_projection"].describe()
    json.dumps(record)  # checkpoint-safe: strings and numbers only
    assert record["class_name"] == "CLIPTextModelWithProjection" and record["pooled_size"] == PROJECTION
    assert record["hidden_size"] == HIDDEN and record["max_length"] == CLIP_POSITIONS
    assert set(record["parts"]) == {"weights", "config", "tokenizer"}


def test_tiny_demo_encoder_is_deterministic(tmp_path):
    a = make_tiny_text_encoder(str(tmp_path / "a"), WORDS, seed=3)
    b = make_tiny_text_encoder(str(tmp_path / "b"), WORDS, seed=3)
    c = make_tiny_text_encoder(str(tmp_path / "c"), WORDS, seed=4)
    before = torch.get_rng_state()
    ea, eb, ec = (FrozenTextEncoder.from_pretrained(p) for p in (a, b, c))
    assert ea.fingerprint == eb.fingerprint != ec.fingerprint
    assert torch.equal(torch.get_rng_state(), before)
    assert sorted(os.listdir(a)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    out = ea.encode(["a red square", "a green square", "a red zebra"])
    assert ea.tokenizer.unk_token_id not in ea.tokenizer("a red square")["input_ids"]
    assert (out.tokens[0, 1] - out.tokens[1, 1]).abs().max() > 1e-3  # red vs green: different vectors


def test_make_tiny_text_encoder_script(tmp_path, capsys):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "make_tiny_text_encoder.py")
    spec = importlib.util.spec_from_file_location("make_tiny_text_encoder", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = str(tmp_path / "enc")
    assert script.main(["--out", out]) == 0
    first = capsys.readouterr().out
    assert "T5EncoderModel" in first and "(frozen)" in first
    assert script.main(["--out", out]) == 0 and "exists; kept" in capsys.readouterr().out
    enc = FrozenTextEncoder.from_pretrained(out)
    from data.builtin import CAPTION_WORDS
    ids = enc.tokenizer(" ".join(CAPTION_WORDS))["input_ids"]
    assert enc.tokenizer.unk_token_id not in ids  # every built-in caption word is in the vocabulary


def test_reloaded_from_its_record(text_encoders, tmp_path):
    """A checkpoint's record reloads the same encoder, also from a pipeline folder (whose
    text_encoder/ alone has no tokenizer); a moved copy given by path is checked against it."""
    pipe = FrozenTextEncoder.from_pretrained(text_encoders["pipeline"], subfolder="text_encoder_2", max_length=8)
    record = json.loads(json.dumps(pipe.describe()))  # as a checkpoint stores it
    again = FrozenTextEncoder.from_record(record, "ckpt.pth")
    assert again.fingerprint == pipe.fingerprint and again.max_length == 8 and again.class_name == pipe.class_name
    moved = tmp_path / "moved"
    shutil.copytree(text_encoders["pipeline"], moved)
    assert FrozenTextEncoder.from_record(record, "ckpt.pth", path=str(moved),
                                         subfolder="text_encoder_2").fingerprint == pipe.fingerprint
    with pytest.raises(UserError, match="text encoder mismatch: ckpt.pth"):
        FrozenTextEncoder.from_record(record, "ckpt.pth", path=str(moved))  # its text_encoder/: a T5


def test_sentencepiece_style_t5_tokenizer(loaded, text_encoders):
    """UMT5 and the pipeline's T5 carry a Unigram T5Tokenizer, the class real T5 / Wan folders name."""
    pipeline = FrozenTextEncoder.from_pretrained(text_encoders["pipeline"])
    assert type(pipeline.tokenizer).__name__ == "T5Tokenizer"  # (beside a umt5 config.json, AutoTokenizer
    for enc in (loaded["umt5"], pipeline):                     # reads the same tokenizer.json generically)
        ids = enc.tokenizer("a red square zebra")["input_ids"]
        assert enc.tokenizer.convert_ids_to_tokens(ids)[:3] == ["▁a", "▁red", "▁square"] and ids[-1] == enc.tokenizer.eos_token_id
        out = enc.encode(["a red square", "a red square moving left"])
        assert out.mask.sum(1).tolist() == [4, 6]


def test_no_token_rows_and_non_finite_outputs(text_encoders, monkeypatch):
    """A tokenizer that gives an empty caption no token at all still yields one (zero, valid)
    token, so attention over it is defined; NaN/Inf from the encoder is refused with the fix."""
    enc = FrozenTextEncoder.from_pretrained(text_encoders["t5"])
    from tokenizers import processors
    enc.tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    out = enc.encode(["", "a dog"])
    assert out.mask.sum(1).tolist() == [1, 2] and (out.tokens[0] == 0).all()
    real = enc.model.forward

    def overflowing(*args, **kwargs):
        result = real(*args, **kwargs)
        result.last_hidden_state[0, 0, 0] = float("inf")
        return result
    monkeypatch.setattr(enc.model, "forward", overflowing)
    with pytest.raises(UserError, match="gave NaN/Inf for caption 'a dog'.* text_encoder.dtype to bf16 or fp32"):
        enc.encode(["a dog"])
