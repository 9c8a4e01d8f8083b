#!/usr/bin/env bash
# The demo, end to end on the built-in moving shapes:
#   venv + requirements (if missing) -> stage 1 VAE (if none yet) -> stage 2 DiT -> predict.
# Extra arguments go to stage 2 as overrides, e.g. ./demo.sh device=cpu train.max_steps=200
set -euo pipefail
cd "$(dirname "$0")"

bash scripts/setup_venv.sh  # .venv + requirements if missing (shared with scripts/test.sh)
PY=.venv/bin/python

if [ -f runs/vae/vae/config.json ]; then
  echo "== stage 1: using the existing VAE in runs/vae/vae (delete runs/vae to retrain it)"
else
  echo "== stage 1: training the VAE (until its held-out PSNR reaches train.target_psnr, at most train.max_steps)"
  "$PY" train_vae.py --config config_vae.yaml
fi

echo "== stage 2: training the DiT on the frozen VAE's latents (train.max_steps steps)"
"$PY" train_advanced.py --config config_advanced.yaml "$@"

echo "== predict: sampling videos from the EMA weights"
"$PY" predict_advanced.py --config predict_advanced.yaml

# How each stage ended and what its result is worth (a time limit that cut a stage short says
# so here, with the value to rerun with), written by the stages to <run>/outcome.txt.
echo
echo "Outcome:"
for f in runs/vae/outcome.txt runs/demo/outcome.txt; do
  if [ -f "$f" ]; then sed 's/^/  /' "$f"; else echo "  ($f missing: that stage ended before writing it)"; fi
done

cat <<MSG

Done.
  sample videos:     runs/demo/predict/sample_000.mp4 (.gif) ... and runs/demo/predict/grid.png
  validation videos: runs/demo/samples/
  TensorBoard:       tensorboard --logdir runs
MSG
