"""Continuing stage 1 with more steps keeps the vae/ that stage-2 runs may have been trained
on (issue 18, defect 16): it moves to vae.<fingerprint>/, the fingerprint stage 2 names."""
import os

import train_vae
from models.vae import FrozenVAE
from tests.test_stage1 import _args


def test_continued_stage1_keeps_the_previous_vae(tmp_path):
    assert train_vae.main(_args(tmp_path, "vae", ["train.max_steps=2"])) == 0
    run = tmp_path / "vae"
    first = FrozenVAE.from_pretrained(str(run / "vae")).fingerprint
    assert train_vae.main(_args(tmp_path, "vae", ["train.max_steps=4", "train.resume=auto"])) == 0
    second = FrozenVAE.from_pretrained(str(run / "vae")).fingerprint
    assert second != first
    kept = run / f"vae.{first}"
    assert FrozenVAE.from_pretrained(str(kept)).fingerprint == first  # the old VAE, intact
    log = (run / "log.txt").read_text()
    assert f"kept the previous {run / 'vae'} (fingerprint {first}) as {kept}" in log
    assert sorted(p for p in os.listdir(run) if p.startswith("vae")) == ["vae", f"vae.{first}"]
    # Finishing again at the same step writes the same VAE: nothing more is kept.
    assert train_vae.main(_args(tmp_path, "vae", ["train.max_steps=4", "train.resume=auto"])) == 0
    assert sorted(p for p in os.listdir(run) if p.startswith("vae")) == ["vae", f"vae.{first}"]
