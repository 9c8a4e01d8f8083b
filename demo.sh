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
  echo "== stage 1: training the VAE (about 4 minutes on 2 CPU cores)"
  "$PY" train_vae.py --config config_vae.yaml
fi

echo "== stage 2: training the DiT on the frozen VAE's latents"
"$PY" train_advanced.py --config config_advanced.yaml "$@"

echo "== predict: sampling videos from the EMA weights"
"$PY" predict_advanced.py --config predict_advanced.yaml

cat <<MSG

Done.
  sample videos:     runs/demo/predict/sample_000.mp4 (.gif) ... and runs/demo/predict/grid.png
  validation videos: runs/demo/samples/
  TensorBoard:       tensorboard --logdir runs
MSG
