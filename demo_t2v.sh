#!/usr/bin/env bash
# The text-to-video demo, end to end on the captioned built-in moving shapes:
#   venv (as demo.sh) -> stage 1 VAE (if none yet) -> the tiny frozen text encoder (if none yet)
#   -> stage 2 DiT with text cross-attention -> predict with prompts.
# Extra arguments go to stage 2 as overrides, e.g. ./demo_t2v.sh device=cpu train.max_steps=200
set -euo pipefail
cd "$(dirname "$0")"

bash scripts/setup_venv.sh  # .venv + requirements if missing (as ./demo.sh)
PY=.venv/bin/python

if [ -f runs/vae/vae/config.json ]; then
  echo "== stage 1: using the existing VAE in runs/vae/vae (delete runs/vae to retrain it)"
else
  echo "== stage 1: training the VAE (until its held-out PSNR reaches train.target_psnr, at most train.max_steps)"
  "$PY" train_vae.py --config config_vae.yaml
fi

# The frozen text encoder: a tiny random T5 over the built-in captions' words (kept if present;
# the same seed always gives the same weights and fingerprint).
"$PY" scripts/make_tiny_text_encoder.py --out runs/tiny_text_encoder

echo "== stage 2: training the text-conditioned DiT (captions embedded once, then cached)"
"$PY" train_advanced.py --config config_t2v_demo.yaml "$@"

echo "== predict: one video per prompt, guided by the learned null caption"
"$PY" predict_advanced.py --config predict_advanced.yaml checkpoint=runs/t2v_demo/latest.pth \
  output_dir=runs/t2v_demo/predict num_videos=6 batch_size=6 \
  'prompts=[a red square moving right on a black background,a blue circle moving up on a black background,a green triangle moving left on a black background,a yellow square moving down on a black background,a white circle moving left on a black background,a violet triangle moving right on a black background]'

cat <<MSG

Done.
  sample videos:     runs/t2v_demo/predict/sample_000.mp4 ... (prompt i on line i of prompts.txt), grid.png
  validation videos: runs/t2v_demo/samples/ (each with its prompts.txt)
  TensorBoard:       tensorboard --logdir runs   (Text tab: the prompts of the validation samples)
  prompt following:  $PY benchmarks/shape_coherence.py --config predict_advanced.yaml checkpoint=runs/t2v_demo/latest.pth num_videos=36 --prompts seen
                     (or --prompts held_out: the shape x colour pairs no training clip showed)
MSG
