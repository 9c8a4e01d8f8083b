"""A stage-2 training process with test hooks, for the multi-process tests of
tests/test_schedule_ddp.py. Launched once per rank (RANK, WORLD_SIZE, MASTER_ADDR, ... in the
environment, as torchrun or srun set them):

    python tests/ddp_hooks.py OUT_PREFIX HOOKS key=value ...

HOOKS, comma-separated:
- `clock`: `training.common.now` becomes a counter that advances 1 s per read, and 1.3 s on
  rank 1 (the ranks' clocks disagree, as two machines' do); the end-step plan is timed after
  1 step over 3 steps, so a short time limit binds within a few steps.
- `nan1`: rank 1 alone gets a NaN loss at every step, with an fp16-style GradScaler on (the
  other rank then sees only a scaler skip: the setup that left it waiting in a collective).
- `short_timeout`: the process group's default timeout is SHORT_TIMEOUT seconds (NCCL's 10
  minutes, scaled down), so a rank left waiting that long in a collective is torn down.
- `slow_text`: every text-encoder call sleeps SLOW_TEXT seconds (an encoder of real size).
- `kill_save<N>` (train.parallel=fsdp): rank 0 kills itself with SIGKILL while saving the sharded
  checkpoint of step N, once every shard and the metadata are written but before the directory
  is published (utils/sharded_checkpoint.py `publish`): a complete-looking but unpublished save.
The record also counts the text encoders each rank loaded (`encoder_loads`) and holds the
latent shape of every micro-batch the rank trained on (`shapes`: data.buckets).

After training, each rank writes OUT_PREFIX.rank<R>.pt: its weights, the learning rate of each
update it attempted, and its LR plan.
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script
    sys.path.insert(0, ROOT)

import train_advanced  # noqa: E402
import training.common as common  # noqa: E402
import training.stage2 as stage2  # noqa: E402
from models.diffusion import Diffusion  # noqa: E402  (the objectives' base: patching its loss patches every objective)

CLOCK_RATE = {0: 1.0, 1: 1.3}  # seconds per clock read, by rank
SHORT_TIMEOUT = 15  # seconds
SLOW_TEXT = 1.0  # seconds per text-encoder call


def main(argv=None) -> int:
    out, hooks, overrides = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
    rank = int(os.environ.get("RANK", "0"))
    if "clock" in hooks:
        reads = [0]

        def fake_now() -> float:
            reads[0] += 1
            return reads[0] * CLOCK_RATE[rank]

        common.now = fake_now
        common.PACE_SKIP_STEPS, common.PACE_MIN_STEPS, common.PACE_MIN_FRACTION = 1, 3, 0.0
    if "nan1" in hooks:
        stage2.make_grad_scaler = lambda device, dtype: torch.amp.GradScaler("cpu")
        if rank == 1:
            original = Diffusion.loss

            def nan_loss(self, v, x0, noise, t, frame_mask=None):
                result = original(self, v, x0, noise, t, frame_mask)
                return result._replace(loss=result.loss * float("nan"))

            Diffusion.loss = nan_loss
    if "short_timeout" in hooks:
        import datetime

        import torch.distributed as torch_dist
        init = torch_dist.init_process_group
        torch_dist.init_process_group = lambda *a, **k: init(
            *a, **{**k, "timeout": datetime.timedelta(seconds=SHORT_TIMEOUT)})
    kill = next((h for h in hooks if h.startswith("kill_save")), None)
    if kill and rank == 0:
        import signal

        from utils import sharded_checkpoint
        publish, doomed = sharded_checkpoint.publish, sharded_checkpoint.dir_name(int(kill[len("kill_save"):]))

        def killed_publish(tmp, final):
            if os.path.basename(final) == doomed:
                os.kill(os.getpid(), signal.SIGKILL)
            publish(tmp, final)
        sharded_checkpoint.publish = killed_publish
    from models.text_encoder import FrozenTextEncoder
    if "slow_text" in hooks:
        import time
        encode = FrozenTextEncoder.encode

        def slow_encode(self, texts):
            time.sleep(SLOW_TEXT)
            return encode(self, texts)
        FrozenTextEncoder.encode = slow_encode
    record = {"lr": [], "state": None, "plan": None, "encoder_loads": 0, "shapes": []}
    batch_latents = stage2.batch_latents

    def spy_latents(s, batch):
        x0, given = batch_latents(s, batch)
        record["shapes"].append(tuple(x0.shape))
        return x0, given
    stage2.batch_latents = spy_latents
    load = FrozenTextEncoder.from_pretrained.__func__

    def counted_load(cls, *a, **k):
        record["encoder_loads"] += 1
        return load(cls, *a, **k)
    FrozenTextEncoder.from_pretrained = classmethod(counted_load)
    original_step = stage2._optimizer_step

    def spy_step(s, stats, per_sample):
        record["lr"].append(s.optimizer.param_groups[0]["lr"])
        outcome = original_step(s, stats, per_sample)
        record["state"] = {k: v.detach().clone() for k, v in s.model.state_dict().items()}
        record["plan"] = s.plan.state_dict()
        return outcome

    stage2._optimizer_step = spy_step
    try:
        return train_advanced.main(["--config", os.path.join(ROOT, "config_advanced.yaml"), *overrides])
    finally:
        torch.save(record, f"{out}.rank{rank}.pt")


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(main)
