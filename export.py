"""Export a fine-tuned pretrained DiT (a `model.pretrained` run) back to diffusers, from any
of its checkpoints: what the run writes to <run>/export/ when training stops.

    python export.py checkpoint=runs/finetune/latest.pth [output_dir=DIR] [use_ema=false] [pretrained=BASE]

LoRA -> DIR/pytorch_lora_weights.safetensors (`WanPipeline.load_lora_weights(DIR)`,
`CogVideoXPipeline.load_lora_weights(DIR)`); full fine-tune -> DIR/transformer/
(`WanTransformer3DModel.from_pretrained(DIR/transformer)`). A LoRA needs its base: the folder
the checkpoint records, or `pretrained=` with the same fingerprint.
"""
from __future__ import annotations

from typing import Optional

from training.checkpoints import export_checkpoint
from utils.cli import parse_args, run_main
from utils.config import ExportConfig, load_config


def main(argv: Optional[list[str]] = None) -> int:
    config_path, overrides, _ = parse_args(argv, __doc__, config_required=False)
    cfg = load_config(ExportConfig, config_path, overrides)
    written = export_checkpoint(cfg.checkpoint, cfg.output_dir, cfg.use_ema, cfg.pretrained)
    print(f"exported the {'EMA' if cfg.use_ema else 'trained'} weights of {cfg.checkpoint}: {written}")
    return 0


if __name__ == "__main__":
    run_main(main)
