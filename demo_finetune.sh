#!/usr/bin/env bash
# The fine-tuning demo, end to end on the captioned built-in shapes, through the very path a
# real Wan 2.1 folder takes (model.pretrained, the family seam, LoRA, export):
#   venv -> stage 1 VAE (if none yet) -> the tiny T5 (if none yet) -> a tiny random Wan pipeline
#   folder (scripts/make_tiny_wan.py) -> "base": a full fine-tune of it with every violet shape
#   held out -> a LoRA on that base with every colour, violet included (the new colour beside the
#   base's: prior preservation) -> prompt following of the new colour and of the base's colours
#   (benchmarks/shape_coherence.py) on both models, and sizes.
# Extra arguments go to both stage-2 runs as overrides, e.g. ./demo_finetune.sh device=cpu
set -euo pipefail
cd "$(dirname "$0")"

bash scripts/setup_venv.sh
PY=.venv/bin/python

if [ -f runs/vae/vae/config.json ]; then
  echo "== stage 1: using the existing VAE in runs/vae/vae (delete runs/vae to retrain it)"
else
  echo "== stage 1: training the VAE (until its held-out PSNR reaches train.target_psnr, at most train.max_steps)"
  "$PY" train_vae.py --config config_vae.yaml
fi
"$PY" scripts/make_tiny_text_encoder.py --out runs/tiny_text_encoder
"$PY" scripts/make_tiny_wan.py --vae runs/vae/vae --text-encoder runs/tiny_text_encoder --out runs/tiny_wan

COLOURS=(red green blue yellow white)
SHAPES=(circle square triangle)
VIOLET="[violet circle,violet square,violet triangle]"
others=()
for c in "${COLOURS[@]}"; do for s in "${SHAPES[@]}"; do others+=("$c $s"); done; done

echo "== base: full fine-tune of the random Wan, every violet shape held out (a colour it never sees)"
"$PY" train_advanced.py --config config_finetune_demo.yaml experiment.name=finetune_base \
  model.finetune=full "data.builtin.held_out_combinations=$VIOLET" "$@"

# The base as a pipeline folder, as a user's pretrained model would be: the tiny Wan's folder
# with the fine-tuned transformer (export/transformer, the EMA weights).
rm -rf runs/finetune_base_pipeline
cp -r runs/tiny_wan runs/finetune_base_pipeline
rm -rf runs/finetune_base_pipeline/transformer
cp -r runs/finetune_base/export/transformer runs/finetune_base_pipeline/transformer

# The LoRA's clips: every colour, violet one in six (128 clips, about 21 violet). Violet clips
# alone teach violet as well but make the LoRA forget the base's colours (measured in
# docs/finetuning.md: 16 of 36 base-colour prompts followed, against 36 with the base's colours
# beside them).
echo "== LoRA: the new colour beside the base's colours, on the frozen base"
"$PY" train_advanced.py --config config_finetune_demo.yaml experiment.name=finetune_lora \
  model.pretrained=runs/finetune_base_pipeline model.finetune=lora "data.builtin.held_out_combinations=[]" \
  data.builtin.num_clips=128 train.max_steps=1500 train.lr=1e-3 "$@"

echo "== prompt following (36 videos each): the new colour, and the base's colours (retention)"
PROMPTS=()
for s in "${SHAPES[@]}"; do PROMPTS+=("a violet $s moving right on a black background"); done
NEW="prompts=[$(IFS=,; echo "${PROMPTS[*]}")]"
for run in finetune_lora finetune_base; do
  "$PY" benchmarks/shape_coherence.py --config predict_advanced.yaml checkpoint=runs/$run/latest.pth \
    num_videos=36 "$NEW" --json runs/$run/coherence_violet.json | tail -n 3
done
RETAIN=()
for pair in "${others[@]}"; do RETAIN+=("a $pair moving right on a black background"); done
OLD="prompts=[$(IFS=,; echo "${RETAIN[*]}")]"
for run in finetune_lora finetune_base; do
  "$PY" benchmarks/shape_coherence.py --config predict_advanced.yaml checkpoint=runs/$run/latest.pth \
    num_videos=36 "$OLD" --json runs/$run/coherence_base_colours.json | tail -n 3
done

lora=$(stat -c %s runs/finetune_lora/export/pytorch_lora_weights.safetensors)
base=$(stat -c %s runs/finetune_base_pipeline/transformer/diffusion_pytorch_model.safetensors)
cat <<MSG

Done.
  base (full fine-tune):  runs/finetune_base/export/transformer   ($base bytes)
  LoRA (the new colour):  runs/finetune_lora/export/pytorch_lora_weights.safetensors   ($lora bytes)
                          WanPipeline.from_pretrained("runs/finetune_base_pipeline").load_lora_weights("runs/finetune_lora/export")
  prompt following:       runs/finetune_{lora,base}/coherence_violet.json (new colour), coherence_base_colours.json (the base's)
MSG
