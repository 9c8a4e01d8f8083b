#!/usr/bin/env bash
# The CUDA code paths on one GPU, each step with a numeric pass condition, one PASS/FAIL line
# per step, in about 15 minutes (an estimate: it has not yet run on a GPU):
#   bash scripts/gpu_check.sh            (from the repo root; exit 1 if any step fails)
# Steps and what each must show (scripts/gpu_check_conditions.py computes the numbers):
#   stage1       the VAE trains: every logged loss finite, the last third's mean below the first's
#   stage2_bf16  stage 2 in bf16 with TF32, torch.compile, activation checkpointing and
#                validation samples: losses finite and falling, sample videos written
#   agreement    the trained DiT: torch.compile vs eager outputs and gradients within 1e-3,
#                bf16 autocast vs fp32 outputs within 5e-2 (relative L2)
#   stage2_fp16  GradScaler: all its steps were real updates (a run whose every step was
#                skipped never reaches its step count), losses finite
#   predict      every sample file and grid.png written
#   diagnose     every code-path check (patchify, identities, gradients, checkpoint, VAE
#                fingerprint) PASSes; its quality checks are shown (a 2-minute model may fail them)
#   torchrun     stage 2 under torchrun on every GPU: world size logged, losses finite and falling.
#                With ONE GPU this is one process: DDP itself (gradient all-reduce, several
#                ranks) is NOT exercised here; the 2-process CPU tests (tests/test_ddp*.py) cover it
#   fsdp         stage 2 with train.parallel=fsdp on one GPU (world size 1) in bf16 (FSDP2 with bf16
#                parameters, fp32 reduction), with torch.compile, activation checkpointing,
#                sharded checkpoints and validation: losses finite and falling; latest.pth
#                consolidated when it stops; rank 0's logged parameter bytes = the model's; a CUDA
#                peak logged; the sharded DiT in bf16 vs eager fp32 within 5e-2 (outputs, gradients)
#   ddp_fp32, fsdp_vs_ddp  the same 20 steps in fp32 (TF32 off) under torchrun on every GPU, ddp
#                then fsdp: trained weights within 1e-2 (relative L2). With ONE GPU both are one
#                process (FSDP's sharding over several ranks: tests/test_fsdp.py on 2 CPU processes)
#   video_vae    a tiny causal video VAE (AutoencoderKLWan) in bf16: stage 2 with its per-window
#                latent cache (layout 'window'), losses finite; bf16 vs fp32 encode/decode within 5e-2
#   workers      stage 2 reading real mp4 files with DataLoader worker processes: losses finite
#   evaluate     evaluate.py (FVD) of the bf16 checkpoint: a finite FVD >= 0. The I3D detector
#                is GPU_CHECK_I3D (a path) if set, else a stand-in with I3D's call and random
#                weights (the code path, not a meaningful number)
#   flow         stage 2 with diffusion.objective=flow_matching (logit-normal t, validation with
#                the `auto` sampler: FlowMatchEuler): losses finite and falling, samples written
#   text         stage 2 conditioned on the built-in captions through a tiny T5 text encoder
#                (scripts/make_tiny_text_encoder.py): losses finite and falling; the checkpoint
#                records a text model and its encoder's fingerprint; the last validation folder
#                has one prompts.txt line per sample video
#   first_frames stage 2 with model.first_frame_conditioning=0.5 and validation (val/image_to_video):
#                losses finite and falling, the image-to-video validation ran
#   image_to_video  evaluate.py image_to_video=true windows=2 of that checkpoint: frame 0 within
#                0.5 dB PSNR of the image's own VAE round trip (the condition kept exactly through
#                sampling), a finite FVD >= 0 for both window positions (extension ran)
#   wan_lora, wan_full, cogvideox_lora, cogvideox_full
#                fine-tuning a tiny random pretrained Wan / CogVideoX pipeline (config_finetune.yaml)
#                in bf16 with gradient checkpointing, LoRA (the base in bf16, adapters fp32) and
#                full: losses finite, the held-out loss (fixed noise and t) falls between the
#                first and last validation; the checkpoint holds the trainable weights
#                only (a LoRA: fp32 adapters) and the base's fingerprint; export/ written; the
#                rebuilt model in bf16 autocast agrees with fp32 within 5e-2 (relative L2); on the GPU the
#                VAE waited in CPU memory (latents cached)
#   cogvideox_i2v_lora
#                the same for a LoRA on a tiny CogVideoX image-to-video transformer (image latents
#                on the channels), trained with model.first_frame_conditioning=0.95
#   buckets      data.buckets auto over three aspect ratios and stills, model.positions rope, bf16,
#                compile (a shape per bucket): loss falling, samples written for every bucket
#   benchmark    bench.py --real-size --compile: a DiT-B/2 step on 16 x 32 x 32 latents, samples/s > 0, MFU
# All runs go into a temporary runs dir (kept, with one log per step, when a step fails or
# GPU_CHECK_KEEP=1). Without CUDA it stops at once with exit status 1.
#
# GPU_CHECK_DRY_CPU=1   print each step's command (device=cpu) and exit 0: the tests check that
#                       every command line is accepted by its script's config.
# GPU_CHECK_DRY_CPU=run run every step on the CPU with tiny sizes, the same numeric conditions
#                       evaluated (several minutes on 2 cores).
# GPU_CHECK_ONLY="stage1 stage2_bf16"  run only these steps (later steps need earlier ones' runs).
# GPU_CHECK_OVERRIDES="key=value ..."  extra overrides for every training run.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
DRY="${GPU_CHECK_DRY_CPU:-}"
ONLY="${GPU_CHECK_ONLY:-}"
read -r -a EXTRA <<<"${GPU_CHECK_OVERRIDES:-}"
export PYTHONUNBUFFERED=1
COND=("$PY" scripts/gpu_check_conditions.py)

no_gpu() {
  echo "gpu_check: needs a CUDA GPU, and $1." >&2
  echo "gpu_check: nothing was run. Run it on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
  exit 1
}
if [ -z "$DRY" ]; then
  # No NVIDIA driver at all: say so before paying for a torch import.
  if [ ! -e /dev/nvidiactl ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    no_gpu "this machine has no NVIDIA driver (no /dev/nvidiactl, no nvidia-smi)"
  fi
  if ! NGPU=$("$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.device_count())" 2>/dev/null); then
    no_gpu "torch.cuda.is_available() is False here ($PY)"
  fi
  DEVICE=cuda
  VAE=(train.max_steps=400 train.time_limit_minutes=2)
  DIT=(train.max_steps=200 validation.num_steps=20)
  FP16_STEPS=100
  FP16=(train.max_steps=$FP16_STEPS)
  PRED_N=4
  PRED=(num_videos=$PRED_N num_steps=20)
  DDP=(train.max_steps=100)
  FSDP_CKPT=50
  BUCKETS=(train.max_steps=200 validation.num_steps=20 "data.builtin.resolutions=[[24,40],[40,24],32]"
           data.builtin.num_stills=64)
  AGREE=(train.max_steps=20)
  VIDEO=(train.max_steps=30 vae.dtype=bf16)
  WORKER_STEPS=30
  WORKERS=(train.max_steps=$WORKER_STEPS data.num_workers=4)
  EVAL=(num_videos=16 num_steps=20 batch_size=16)
  I2V=(num_videos=16 num_steps=20 batch_size=16)
  FT=(train.max_steps=60 train.lr=1e-3 train.log_every=5)
  BENCH=(--real-size --compile)
else
  NGPU=2  # two CPU processes over gloo stand in for the GPUs
  DEVICE=cpu
  TINY=(data.resolution=16 data.num_frames=4 data.builtin.num_clips=8 data.builtin.clip_frames=8
        data.builtin.num_val_clips=2)
  VAE=("${TINY[@]}" train.max_steps=12 train.log_every=1 train.batch_size=4 train.scale_num_clips=4
       vae.block_out_channels=[8,16,16] vae.norm_num_groups=8)
  SMALL_DIT=(model.hidden_size=32 model.depth=2 model.num_heads=2)
  DIT=("${TINY[@]}" train.max_steps=12 train.log_every=1 train.batch_size=2 validation.num_steps=2
       validation.num_videos=2 "${SMALL_DIT[@]}")
  FP16_STEPS=3
  FP16=("${TINY[@]}" train.max_steps=$FP16_STEPS train.batch_size=2 validation.num_steps=2
        validation.num_videos=2 "${SMALL_DIT[@]}")
  PRED_N=2
  PRED=(num_videos=$PRED_N num_steps=2)
  DDP=("${DIT[@]}")
  FSDP_CKPT=4
  BUCKETS=("${DIT[@]}" "data.builtin.resolutions=[[16,24],[24,16],16]" data.builtin.num_stills=4 data.bucket_area=256)
  AGREE=("${DIT[@]}")
  VIDEO=(data.resolution=16 data.num_frames=5 data.builtin.num_clips=4 data.builtin.clip_frames=9
         data.builtin.num_val_clips=2 train.max_steps=3 train.log_every=1 train.batch_size=2
         validation.num_videos=2 validation.num_steps=2 "${SMALL_DIT[@]}")
  WORKER_STEPS=3
  WORKERS=(data.resolution=16 data.num_frames=4 train.max_steps=$WORKER_STEPS train.log_every=1 train.batch_size=2
           data.num_workers=2 validation.num_videos=2 validation.num_steps=2 "${SMALL_DIT[@]}")
  EVAL=(num_videos=4 num_steps=2 batch_size=4)
  I2V=(num_videos=2 num_steps=2 batch_size=2)
  FT=(train.max_steps=8 train.lr=1e-3 train.log_every=1)
  BENCH=(--real-size --quick --device cpu)
fi

RUNS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
FAILED=0
COMMON=(device=$DEVICE "experiment.runs_dir=$RUNS" train.resume=null)
echo "gpu_check: $NGPU GPU(s), device=$DEVICE, python $PY, runs in $RUNS"

# step NAME CHECK COMMAND...: run COMMAND (log in $RUNS/NAME.log), then CHECK (a shell command,
# usually a numeric condition; its output is appended to the log and its last line shown next
# to PASS/FAIL); print PASS or FAIL with the seconds taken and, on failure, the end of the
# log. With ALLOW_EXIT=N set, exit status N of COMMAND counts as success too (CHECK decides).
wanted() { [ -z "$ONLY" ] || [[ " ${ONLY//,/ } " == *" $1 "* ]]; }

step() {
  local name=$1 check=$2
  shift 2
  wanted "$name" || return 0
  if [ "$DRY" = 1 ]; then
    printf 'DRY %s:' "$name"; printf ' %q' "$@"; echo
    return
  fi
  local start=$SECONDS
  "$@" >"$RUNS/$name.log" 2>&1
  local rc=$?
  local said=""
  if { [ $rc -eq 0 ] || [ "$rc" = "${ALLOW_EXIT:-0}" ]; } && said=$(eval "$check" 2>&1); then
    printf 'PASS %-14s %4ds  %s\n' "$name" $((SECONDS - start)) "$(tail -n 1 <<<"$said")"
  else
    printf 'FAIL %-14s %4ds  exit %d; log %s:\n' "$name" $((SECONDS - start)) $rc "$RUNS/$name.log"
    { echo "-- pass condition:"; echo "$said"; } >>"$RUNS/$name.log"
    tail -n 15 "$RUNS/$name.log" | sed 's/^/    /'
    FAILED=1
  fi
}

# Inputs of the later steps, made before any step runs: a tiny random causal video VAE, real
# mp4 clips for the DataLoader workers, (without GPU_CHECK_I3D) a stand-in I3D detector, and a
# tiny random T5 text encoder over the built-in captions' words.
I3D="${GPU_CHECK_I3D:-$RUNS/i3d_standin.pt}"
TEXT_ENCODER="$RUNS/text_encoder"
if [ "$DRY" != 1 ] && { wanted video_vae || wanted workers || wanted evaluate || wanted image_to_video || wanted text; }; then
  if ! { "${COND[@]}" make_video_vae "$RUNS/video_vae" && "${COND[@]}" make_clips "$RUNS/clips" 12 &&
         { [ -f "$I3D" ] || "${COND[@]}" make_detector "$I3D"; } &&
         "$PY" scripts/make_tiny_text_encoder.py --out "$TEXT_ENCODER"; } >"$RUNS/prepare.log" 2>&1; then
    echo "FAIL prepare: the inputs of the video_vae, workers, evaluate, image_to_video and text steps; log $RUNS/prepare.log"
    tail -n 15 "$RUNS/prepare.log" | sed 's/^/    /'
    FAILED=1
  fi
fi

# Every condition below is a command whose exit status decides; `&&` chains several.
step stage1 '[ -f "$RUNS/vae/vae/config.json" ] && "${COND[@]}" loss "$RUNS/vae/log.txt" --falling' \
  "$PY" train_vae.py --config config_vae.yaml "${COMMON[@]}" experiment.name=vae "${VAE[@]}" "${EXTRA[@]}"

VAE_PATH="vae.path=$RUNS/vae/vae"
step stage2_bf16 'grep -q "precision bfloat16" "$RUNS/bf16/log.txt" && ls "$RUNS"/bf16/samples/*/sample_000.mp4 >/dev/null && "${COND[@]}" loss "$RUNS/bf16/log.txt" --falling' \
  "$PY" train_advanced.py --config config_advanced.yaml "${COMMON[@]}" "$VAE_PATH" experiment.name=bf16 \
  train.precision=bf16 train.tf32=true train.compile=true train.activation_checkpointing=true \
  validation.every_epochs=1 "${DIT[@]}" "${EXTRA[@]}"

step agreement 'grep "^ok: " "$RUNS/agreement.log"' \
  "${COND[@]}" agree "$RUNS/bf16/latest.pth" $DEVICE

step stage2_fp16 'grep -q "precision float16" "$RUNS/fp16/log.txt" && "${COND[@]}" steps "$RUNS/fp16" $FP16_STEPS' \
  "$PY" train_advanced.py --config config_advanced.yaml "${COMMON[@]}" "$VAE_PATH" experiment.name=fp16 \
  train.precision=fp16 validation.every_epochs=0 "${FP16[@]}" "${EXTRA[@]}"

step predict '[ -f "$RUNS/predict/grid.png" ] && n=$(ls "$RUNS"/predict/sample_*.* | wc -l) && echo "$n sample files" && [ "$n" -eq $((2 * PRED_N)) ]' \
  "$PY" predict_advanced.py --config predict_advanced.yaml device=$DEVICE \
  "checkpoint=$RUNS/bf16/latest.pth" "output_dir=$RUNS/predict" "${PRED[@]}"

# diagnose exits 1 when any check fails, quality checks included; the condition requires every
# code-path check to PASS and shows the quality checks.
ALLOW_EXIT=1 step diagnose '"${COND[@]}" diagnose "$RUNS/diagnose.log"' \
  "$PY" diagnose.py --config config_advanced.yaml \
  device=$DEVICE "$VAE_PATH" "experiment.runs_dir=$RUNS" experiment.name=bf16 "${DIT[@]}" \
  --checkpoint "$RUNS/bf16/latest.pth"

step torchrun "grep -q 'world size $NGPU' \"\$RUNS/ddp/log.txt\" && \"\${COND[@]}\" loss \"\$RUNS/ddp/log.txt\" --falling" \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train_advanced.py \
  --config config_advanced.yaml "${COMMON[@]}" "$VAE_PATH" experiment.name=ddp \
  validation.every_epochs=0 "${DDP[@]}" "${EXTRA[@]}"

step fsdp 'grep -q "parallel: fsdp" "$RUNS/fsdp/log.txt" && "${COND[@]}" loss "$RUNS/fsdp/log.txt" --falling && "${COND[@]}" fsdp "$RUNS/fsdp" $DEVICE' \
  "$PY" train_advanced.py --config config_advanced.yaml "${COMMON[@]}" "$VAE_PATH" experiment.name=fsdp \
  train.parallel=fsdp train.precision=bf16 train.compile=true train.activation_checkpointing=true \
  "train.checkpoint_every=$FSDP_CKPT" validation.every_epochs=1 "${DIT[@]}" "${EXTRA[@]}"

step buckets 'grep -q "positions rope" "$RUNS/buckets/log.txt" && "${COND[@]}" loss "$RUNS/buckets/log.txt" --falling && n=$(ls -d "$RUNS"/buckets/samples/*/*x*x*/ | wc -l) && echo "$n bucket sample folders" && [ "$n" -ge 3 ]' \
  "$PY" train_advanced.py --config config_advanced.yaml "${COMMON[@]}" "$VAE_PATH" experiment.name=buckets \
  data.buckets=auto model.positions=rope train.precision=bf16 train.compile=true validation.every_epochs=1 \
  "${BUCKETS[@]}" "${EXTRA[@]}"

step ddp_fp32 '"${COND[@]}" loss "$RUNS/ddp32/log.txt"' \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train_advanced.py \
  --config config_advanced.yaml "${COMMON[@]}" "$VAE_PATH" experiment.name=ddp32 train.precision=fp32 \
  train.tf32=false validation.every_epochs=0 "${AGREE[@]}" "${EXTRA[@]}"

step fsdp_vs_ddp '"${COND[@]}" same_weights "$RUNS/ddp32/latest.pth" "$RUNS/fsdp32/latest.pth" 1e-2' \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train_advanced.py \
  --config config_advanced.yaml "${COMMON[@]}" "$VAE_PATH" experiment.name=fsdp32 train.parallel=fsdp \
  train.precision=fp32 train.tf32=false validation.every_epochs=0 "${AGREE[@]}" "${EXTRA[@]}"

step video_vae '"${COND[@]}" loss "$RUNS/video/log.txt" && "${COND[@]}" cache "$RUNS/video" && "${COND[@]}" vae_bf16 "$RUNS/video_vae" $DEVICE' \
  "$PY" train_advanced.py --config config_advanced.yaml "${COMMON[@]}" "vae.path=$RUNS/video_vae" \
  experiment.name=video data.cache=auto validation.every_epochs=0 "${VIDEO[@]}" "${EXTRA[@]}"

step workers '"${COND[@]}" steps "$RUNS/workers" "$WORKER_STEPS"' \
  "$PY" train_advanced.py --config config_advanced.yaml "${COMMON[@]}" "$VAE_PATH" experiment.name=workers \
  "data.path=$RUNS/clips" data.cache=off validation.every_epochs=0 "${WORKERS[@]}" "${EXTRA[@]}"

step evaluate '"${COND[@]}" fvd "$RUNS/fvd.json"' \
  "$PY" evaluate.py --config evaluate.yaml device=$DEVICE "checkpoint=$RUNS/bf16/latest.pth" \
  "fvd.detector_path=$I3D" "output=$RUNS/fvd.json" "${EVAL[@]}"

step flow 'ls "$RUNS"/flow/samples/*/sample_000.mp4 >/dev/null && "${COND[@]}" loss "$RUNS/flow/log.txt" --falling' \
  "$PY" train_advanced.py --config config_advanced.yaml "${COMMON[@]}" "$VAE_PATH" experiment.name=flow \
  diffusion.objective=flow_matching diffusion.timestep_sampling=logit_normal validation.every_epochs=1 \
  "${DIT[@]}" "${EXTRA[@]}"

step text '"${COND[@]}" loss "$RUNS/text/log.txt" --falling && "${COND[@]}" text "$RUNS/text"' \
  "$PY" train_advanced.py --config config_advanced.yaml "${COMMON[@]}" "$VAE_PATH" experiment.name=text \
  model.conditioning=text data.builtin.captions=true "text_encoder.path=$TEXT_ENCODER" \
  validation.every_epochs=1 "${DIT[@]}" "${EXTRA[@]}"

step first_frames 'grep -q "image-to-video samples of" "$RUNS/ffc/log.txt" && "${COND[@]}" loss "$RUNS/ffc/log.txt" --falling' \
  "$PY" train_advanced.py --config config_advanced.yaml "${COMMON[@]}" "$VAE_PATH" experiment.name=ffc \
  model.first_frame_conditioning=0.5 validation.every_epochs=1 "${DIT[@]}" "${EXTRA[@]}"

step image_to_video '"${COND[@]}" first_frames "$RUNS/i2v.json" 2' \
  "$PY" evaluate.py --config evaluate.yaml device=$DEVICE "checkpoint=$RUNS/ffc/latest.pth" \
  "fvd.detector_path=$I3D" "output=$RUNS/i2v.json" image_to_video=true windows=2 "${I2V[@]}"

# Fine-tuning a pretrained DiT: tiny random Wan and CogVideoX pipeline folders (the family seam,
# LoRA through peft, gradient checkpointing, the native schedule and sampler, export).
PRETRAINED="$RUNS/pretrained"
if [ "$DRY" != 1 ] && { wanted wan_lora || wanted wan_full || wanted cogvideox_lora || wanted cogvideox_full \
    || wanted cogvideox_i2v_lora; }; then
  "${COND[@]}" make_pretrained "$PRETRAINED" >"$RUNS/prepare_pretrained.log" 2>&1 || {
    echo "FAIL prepare: the tiny pretrained pipelines; log $RUNS/prepare_pretrained.log"; FAILED=1; }
fi
FT_DATA=(data.path=builtin:moving_shapes data.captions=null data.builtin.captions=true data.resolution=16
         data.builtin.num_clips=4 data.builtin.clip_frames=12 data.window_stride=4 vae.tiling=false
         train.batch_size=2 train.precision=bf16 train.activation_checkpointing=true text_encoder.max_length=16
         validation.every_epochs=1 validation.num_videos=2 validation.num_steps=4 train.warmup_steps=2)
for family in wan cogvideox; do
  frames=5; [ $family = cogvideox ] && frames=9
  for finetune in lora full; do
    step "${family}_$finetune" 'grep -q "precision bfloat16" "$RUNS/ft_${family}_$finetune/log.txt" && "${COND[@]}" loss "$RUNS/ft_${family}_$finetune/log.txt" && "${COND[@]}" val_loss "$RUNS/ft_${family}_$finetune/log.txt" && "${COND[@]}" pretrained "$RUNS/ft_${family}_$finetune" $finetune $DEVICE && "${COND[@]}" parked "$RUNS/ft_${family}_$finetune/log.txt" $DEVICE' \
      "$PY" train_advanced.py --config config_finetune.yaml "${COMMON[@]}" "model.pretrained=$PRETRAINED/$family" \
      "experiment.name=ft_${family}_$finetune" "model.finetune=$finetune" data.num_frames=$frames \
      "${FT_DATA[@]}" "${FT[@]}" "${EXTRA[@]}"
  done
done
step cogvideox_i2v_lora 'grep -q "precision bfloat16" "$RUNS/ft_cogvideox_i2v/log.txt" && "${COND[@]}" loss "$RUNS/ft_cogvideox_i2v/log.txt" && "${COND[@]}" pretrained "$RUNS/ft_cogvideox_i2v" lora $DEVICE && "${COND[@]}" parked "$RUNS/ft_cogvideox_i2v/log.txt" $DEVICE' \
  "$PY" train_advanced.py --config config_finetune.yaml "${COMMON[@]}" "model.pretrained=$PRETRAINED/cogvideox_i2v" \
  experiment.name=ft_cogvideox_i2v model.finetune=lora data.num_frames=9 model.first_frame_conditioning=0.95 \
  "${FT_DATA[@]}" "${FT[@]}" "${EXTRA[@]}"

step benchmark 'grep -q MFU "$RUNS/benchmark.log" && "${COND[@]}" bench "$RUNS/bench.json"' \
  "$PY" benchmarks/bench.py "${BENCH[@]}" --json "$RUNS/bench.json"

[ "$DRY" = 1 ] && { rm -rf "$RUNS"; exit 0; }
[ "$NGPU" -lt 2 ] && [ "$DEVICE" = cuda ] && echo "note: 1 GPU, so torchrun ran one process: DDP itself was not exercised (it needs 2 or more GPUs; the CPU tests run it with 2 processes)"
if [ $FAILED -ne 0 ]; then
  echo "gpu_check: FAILED (logs and runs kept in $RUNS)"
  exit 1
fi
echo "gpu_check: all steps passed"
if [ -n "${GPU_CHECK_KEEP:-}" ]; then echo "runs kept in $RUNS"; else rm -rf "$RUNS"; fi
