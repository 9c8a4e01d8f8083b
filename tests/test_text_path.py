"""The text path under many processes and at predict: the caption encoding shared over the
ranks (the encoder loaded only where it encodes, setup's waits under their own timeout),
captions looked up in the data workers and trimmed to the batch's longest, and the encoder's
recorded dtype used when sampling."""
import os
import warnings

import pytest
import torch

from tests.test_schedule_ddp import _launch
from tests.test_stage2 import ROOT, TINY, random_vae  # noqa: F401  (fixture)
from tests.test_text_conditioning import _text_args
from utils.checkpoint import load_checkpoint


@pytest.mark.slow  # two 2-process runs with a slowed encoder: ~1 min
def test_two_ranks_share_the_caption_encoding_and_wait_under_the_setup_timeout(tmp_path, random_vae,
                                                                            text_encoders):  # noqa: F811
    """With the process group's timeout at 15 s and an encoder taking 1 s per caption, rank 0
    encoding every caption alone (25+ s) left rank 1 torn down in its barrier before step 0.
    Shared, each rank encodes half, and the waits between are the setup group's. Resumed with
    the cache complete, only rank 0 loads the encoder (for its fingerprint)."""
    out = tmp_path / "rec"
    args = [*TINY, f"vae.path={random_vae}", f"experiment.runs_dir={tmp_path}", "experiment.name=run",
            "data.builtin.num_clips=8", "train.checkpoint_every=1000", "text_encoder.batch_size=1",
            *_text_args(text_encoders["t5"], 2)]
    results = _launch(2, "short_timeout,slow_text", out, args)
    for code, text in results:
        assert code == 0, text[-3000:]
    loads = [torch.load(f"{out}.rank{r}.pt", weights_only=True)["encoder_loads"] for r in (0, 1)]
    assert loads == [1, 1]  # both had captions to encode
    log = open(os.path.join(tmp_path, "run", "log.txt")).read()
    first = [line for line in log.splitlines() if "distinct captions" in line][0]
    assert "encoding shared by 2 process(es)" in first
    n = int(first.split(": ")[1].split(" distinct")[0])
    assert n >= 20  # so that one rank alone would have outlasted the timeout
    results = _launch(2, "short_timeout,slow_text", out, args[:-3] + _text_args(text_encoders["t5"], 3,
                                                                               ["train.resume=auto"]))
    for code, text in results:
        assert code == 0, text[-3000:]
    loads = [torch.load(f"{out}.rank{r}.pt", weights_only=True)["encoder_loads"] for r in (0, 1)]
    assert loads == [1, 0]  # nothing to encode: rank 1 never loads (nor hashes) the encoder
    assert load_checkpoint(os.path.join(tmp_path, "run", "latest.pth"))["step"] == 3


def test_captions_are_looked_up_in_the_workers_and_trimmed_to_the_batch(random_vae, text_encoders, tmp_path):
    """The loader's batches carry the text keywords (the collate runs in the data workers), cut
    to the batch's longest caption; the DiT's output equals the output on fully padded text."""
    from data import build_dataset
    from data.loader import make_loader
    from models.dit import VideoDiT
    from training.conditioning import conditioning_for_training
    from utils.config import TrainRunConfig, load_config
    from utils.dist import DistInfo
    from utils.logging import RunLogger
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                      [*TINY, f"vae.path={random_vae}", *_text_args(text_encoders["t5"], 1)])
    dataset = build_dataset(cfg.data, "train", 0)
    seam = conditioning_for_training(cfg, dataset, torch.device("cpu"), RunLogger(None))
    seam.prepare(lambda: dataset.distinct_captions(), str(tmp_path / "text_cache"), DistInfo(), RunLogger(None))
    loader = make_loader(dataset, 2, shuffle=False, seed=0, num_workers=1, collate_fn=seam.collate)
    batch = next(iter(loader))
    kw = batch["text_kwargs"]
    lengths = kw["text_mask"].sum(1)
    assert kw["text"].shape[1] == int(lengths.max()) < seam.encoder_record["max_length"]
    full = seam.table.lookup(batch["caption"])  # padded to max_length
    torch.testing.assert_close(kw["text"], full[0][:, :kw["text"].shape[1]])
    assert not full[0][:, kw["text"].shape[1]:].any()
    torch.manual_seed(0)
    model = VideoDiT(cfg.model.resolved(), 4, 4, 4, text_dim=seam.dims()["text_dim"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
        x, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([100, 700])
        trimmed = model(x, t, **seam.train_kwargs(batch, torch.device("cpu"), None))
        padded = model(x, t, text=full[0], text_mask=full[1], drop_text=torch.zeros(2, dtype=torch.bool))
    torch.testing.assert_close(trimmed, padded, rtol=0, atol=1e-6)


def test_predict_embeds_prompts_in_the_recorded_dtype(text_encoders):
    """A model trained on bf16 embeddings gets bf16 embeddings at predict (dtype auto), and
    another dtype asked for is said."""
    from models.text_encoder import FrozenTextEncoder, TextWarning
    from training.conditioning import conditioning_from_checkpoint
    trained = FrozenTextEncoder.from_pretrained(text_encoders["t5"], dtype="bf16")
    ckpt = {"model": {"dims": {"text_dim": trained.hidden_size}},
            "conditioning": {"kind": "text", "text_encoder": trained.describe()}}
    seam = conditioning_from_checkpoint(ckpt, "x.pth", torch.device("cpu"))
    assert seam.samples(1, prompts=["a red square"]).cond["text"].dtype == torch.bfloat16
    with pytest.warns(TextWarning, match="trained on bf16 embeddings"):
        seam = conditioning_from_checkpoint(ckpt, "x.pth", torch.device("cpu"), text_encoder_dtype="fp32")
    assert seam.samples(1, prompts=["a red square"]).cond["text"].dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded dtype asked for: nothing to say
        conditioning_from_checkpoint(ckpt, "x.pth", torch.device("cpu"), text_encoder_dtype="bf16")
