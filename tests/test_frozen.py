"""The frozen pretrained modules (models/frozen.py): the VAE and the text encoder share one base
that keeps them in eval mode with no gradients and identifies them by the weights as stored,
before any dtype cast."""
import os

import pytest
import torch

from models.frozen import FrozenPretrained
from models.text_encoder import FrozenTextEncoder
from models.vae import FrozenVAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE = "tests/fixtures/vae"


@pytest.fixture(scope="module")
def frozen(text_encoders):
    vae = os.path.join(ROOT, VAE)
    return {"vae": (lambda dtype: FrozenVAE.from_pretrained(vae, "cpu", dtype=dtype)),
            "text": (lambda dtype: FrozenTextEncoder.from_pretrained(text_encoders["t5"], "cpu", dtype=dtype))}


@pytest.mark.parametrize("kind", ["vae", "text"])
def test_a_frozen_module_stays_frozen_and_keeps_its_identity_under_a_cast(frozen, kind):
    fp32, bf16 = frozen[kind]("fp32"), frozen[kind]("bf16")
    assert isinstance(fp32, FrozenPretrained)
    for m in (fp32, bf16):
        m.train()  # asked to train: refused silently, as a frozen module must
        assert not m.training and not any(sub.training for sub in m.modules())
        assert not any(p.requires_grad for p in m.parameters())
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    assert (fp32.dtype_name, bf16.dtype_name) == ("float32", "bfloat16")
    assert fp32.fingerprint == bf16.fingerprint  # taken from the weights as stored
    assert fp32.device == torch.device("cpu") and fp32.path == bf16.path
    assert fp32.describe()["dtype"] == "float32" and "(frozen)" in fp32.summary()


def test_a_vae_is_parked_in_cpu_memory_while_training_reads_cached_latents(frozen, monkeypatch):
    """On a GPU with every latent cached the VAE waits in CPU memory (training/stage2.py
    `park_vae`) and `on(device)` brings it to the GPU for validation only, back after it, also
    when validation fails. The moves are recorded (this host has no GPU to move to)."""
    from training.stage2 import park_vae
    vae = frozen["vae"]("fp32")
    moves = []
    monkeypatch.setattr(type(vae), "to", lambda self, device: moves.append(str(device)) or self)

    class Log:
        lines: list = []

        def info(self, line):
            self.lines.append(line)
    log = Log()
    assert not park_vae(vae, True, torch.device("cpu"), log)  # on CPU: nothing to free
    assert not park_vae(vae, False, torch.device("cuda"), log)  # not cached: the step encodes
    assert moves == [] and log.lines == []
    assert park_vae(vae, True, torch.device("cuda"), log)
    assert moves == ["cpu"] and "VAE parked in CPU memory" in log.lines[0]
    with vae.on(torch.device("cuda:0")):
        assert moves[-1] == "cuda:0"
    assert moves[-1] == "cpu"
    with pytest.raises(RuntimeError):
        with vae.on("cuda:0"):
            raise RuntimeError("validation failed")
    assert moves[-2:] == ["cuda:0", "cpu"]
