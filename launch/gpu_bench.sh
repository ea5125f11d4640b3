#!/usr/bin/env bash
# The GPU rows of the benchmarks (README: Benchmarks; issue #9) as one command for a lent GPU machine, which
# has jax with CUDA and torch but not tensorflow-datasets, grain, diffusers and the rest: those travel as wheels.
#
#   .venv/bin/python launch/gpu_wheels.py         # here, once: the wheels it lacks, into .whl/ (git-ignored)
#   launch/gpu_bench.sh [NAME ...]                # there (the device tool's run, carry [".whl"]); default: all
#
# Benchmarks, in the default order (NAME: what, its time limit; all but base64 and remat by default):
#   env        the GPU, the Python packages and what jax sees (60 s)
#   step       the 64 px U-Net train step in bfloat16: FLOPs, step time, MFU and the GPU program's roofline (bytes
#              per step, FLOPs per byte; drawn as $OUT/roofline_WIDTH_BATCH.png) at widths 128 and 256 (batch 128)
#              and at width 128, batch 512 (200 s each; one took 102 s on the H200 on 2026-12-04, most of it
#              compiling); STEP_ROWS="WIDTH,BATCH ..." names other rows
#   attention  the same step at width 128, batch 128 with attention "xla" and "auto" (cuDNN's flash attention for the
#              self-attention; models/attention.py), one `bench step` each (2 x 150 s)
#   base64     the pod's 64 px base, configs/imagen_base64.py (a 2.01B-parameter U-Net under a frozen T5-XXL, remat
#              keeping convolutions' and projections' outputs),
#              at a per-device batch of 32, with 90% of the GPU's memory (400 s; not yet run on a GPU: its compile
#              time is unknown; not in the default set)
#   remat      the 64 px U-Net step at width 256, batch 128 without remat, with model.remat_policy "full" and with
#              "matmuls", one `bench step` each (its peak memory column is per process): what each policy costs in
#              time and saves in memory on the GPU (3 x 150 s; not in the default set)
#   peer_dit   the demo DiT (bfloat16) against diffusers' PixArt transformer on the same GPU (180 s)
#   peer_unet  the 64 px U-Net (bfloat16, width 128) against diffusers' UNet2DConditionModel (180 s)
#   peer_wan   Wan 2.1 1.3B's transformer (random weights, made here by diffusers) against diffusers' on the same
#              GPU, on the tokens of 9 frames of 480 x 832 (its latents' 3 x 60 x 104: clips given as pixels to a
#              Wan of 3 input channels, the rest of the network as 1.3B's), batch 1, bfloat16, a frozen one-layer
#              text encoder 4096 wide; WAN_PEER="LAYERS DIM FFN HEADS FRAMES HEIGHT WIDTH" shrinks it (400 s; not
#              yet run on a GPU: not in the default set)
#   peer_sd    Stable Diffusion 1.5's U-Net (random weights, made here by diffusers; model.backbone='sd_unet') against
#              diffusers' UNet2DConditionModel of the same weights on the same GPU, on 64 x 64 inputs (its latents'
#              size at 512 px, given as 3-channel pixels), batch 8, bfloat16, a frozen one-layer text encoder 768
#              wide; SD_PEER="BLOCK_OUT_CHANNELS SIZE BATCH" shrinks it (400 s; not yet run on a GPU: not in the
#              default set)
#   video      the video DiT's attention at 16 frames of 32 px: factorised, spacetime, spacetime with 2-frame
#              tubelets, one `bench step` each (3 x 120 s)
#   compile    compile seconds against run time at XLA's level 0 and 3, demo model (240 s)
#   profile    where the 64 px U-Net's bfloat16 step (width 128) spends its time, by kind of op and phase (180 s),
#              with XLA's command buffers (CUDA graphs) off, so that the trace times each op, not each graph
# Each runs under its own limit (`timeout`), so one that fails or hangs leaves the others. Writes
# $OUT/gpu_bench.md (each benchmark's command and table; OUT defaults to out/gpu_bench) and
# $OUT/gpu_bench.log (their logs). PYTHON (default python3) names another interpreter, e.g. to rehearse on a CPU;
# WHEELS (default .whl) the folder of wheels to install first, into /tmp/site (none there: nothing installed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_bench}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  rm -rf /tmp/site  # a warm machine keeps the last call's install, which --upgrade does not take away
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { echo "error: installing the wheels of $WHEELS failed (above); fetch them again with" \
    ".venv/bin/python launch/gpu_wheels.py on the machine that carries them" >&2; exit 1; }
  PYTHONPATH=/tmp/site:$PWD
fi
# jax and torch share the GPU in `peer`: jax takes half of its memory, not the default three quarters.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}

bench() {  # LIMIT_S MODE FLAGS...: one `python -m diffusion_jax.bench` run; its table to the .md, its log to the .log
  local limit=$1 started=$SECONDS status
  shift
  printf '\n### `python -m diffusion_jax.bench %s`\n\n' "$*" >> "$OUT/gpu_bench.md"
  echo "== bench $* (limit ${limit} s)" >> "$OUT/gpu_bench.log"
  timeout "$limit" "$PYTHON" -m diffusion_jax.bench "$@" >> "$OUT/gpu_bench.md" 2>> "$OUT/gpu_bench.log"
  status=$?
  if [ $status -eq 124 ]; then
    printf '\n(stopped: over its %s s)\n' "$limit" >> "$OUT/gpu_bench.md"
  elif [ $status -ne 0 ]; then
    printf '\n(exit status %s: see gpu_bench.log)\n' "$status" >> "$OUT/gpu_bench.md"
  fi
  echo "bench $1: exit $status after $((SECONDS - started)) s" >&2
}

run() {
  case $1 in
    env)
      { echo "## $(date -u +%F) on $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi')"; echo
        timeout 60 "$PYTHON" -c 'import importlib.metadata as m, jax
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "grain", "torch",
             "diffusers"):
  try:
    print(f"- {name} {m.version(name)}")
  except m.PackageNotFoundError:
    print(f"- {name}: not installed")
print(f"- jax devices: {jax.devices()}")'
      } >> "$OUT/gpu_bench.md" 2>> "$OUT/gpu_bench.log" ;;
    step)
      for width_batch in ${STEP_ROWS:-128,128 256,128 128,512}; do
        bench 200 step --config=configs/t2i_shapes.py --config.data.resolution=64 --config.model.dtype=bfloat16 \
          --widths=${width_batch%,*} --config.train.batch_size=${width_batch#*,} --steps=10 \
          --plot="$OUT/roofline_${width_batch/,/_}.png"
      done ;;
    attention)
      for implementation in xla auto; do
        bench 150 step --config=configs/t2i_shapes.py --config.data.resolution=64 --config.model.dtype=bfloat16 \
          --widths=128 --config.train.batch_size=128 --config.model.attention=$implementation --steps=10
      done ;;
    base64)
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 bench 400 step --config=configs/imagen_base64.py --widths=512 \
        --config.train.batch_size=32 --steps=5 ;;
    remat)
      for remat in --config.model.remat=False "--config.model.remat=True --config.model.remat_policy=full" \
                   "--config.model.remat=True --config.model.remat_policy=matmuls"; do
        bench 150 step --config=configs/t2i_shapes.py --config.data.resolution=64 --config.model.dtype=bfloat16 \
          --widths=256 --config.train.batch_size=128 $remat --steps=10
      done ;;
    peer_dit)
      bench 180 peer --config=configs/t2i_shapes.py:dit --config.model.dtype=bfloat16 --steps=10 ;;
    peer_unet)
      bench 180 peer --config=configs/t2i_shapes.py --config.data.resolution=64 --config.model.dtype=bfloat16 \
        --config.model.channels=128 --config.train.batch_size=64 --steps=10 ;;
    peer_wan)
      local layers dim ffn heads frames height width wan=/tmp/random_wan
      read -r layers dim ffn heads frames height width <<< "${WAN_PEER:-30 1536 8960 12 3 60 104}"
      timeout 300 "$PYTHON" -c 'import sys, diffusers, torch
from diffusion_jax.text import tokenizers
layers, dim, ffn, heads = map(int, sys.argv[1:5])
torch.manual_seed(0)
diffusers.WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=3,
                                out_channels=3, text_dim=4096, freq_dim=256, ffn_dim=ffn,
                                num_layers=layers).save_pretrained(sys.argv[5])
tokenizers.train_sentencepiece(["a large red circle", "a cat walks on the grass"] * 8, sys.argv[5] + "/spiece", 30)' \
        "$layers" "$dim" "$ffn" "$heads" "$wan" >> "$OUT/gpu_bench.log" 2>&1
      bench 400 peer --config=configs/t2v_moving_shapes.py --config.model.backbone=wan --config.model.wan_path=$wan \
        --config.diffusion.path=flow --config.diffusion.prediction=flow --config.data.image_fraction=0 \
        --config.data.dataset=tfds --config.data.name=none --config.data.frames="$frames" \
        --config.data.resolution="$height" --config.data.width="$width" --config.train.batch_size=1 \
        --config.mesh.data=1 --config.text.max_length=512 --config.text.trainable=False \
        --config.text.tokenizer=sentencepiece --config.text.spiece_path=$wan/spiece.model \
        --config.text.t5.d_model=4096 --config.text.t5.num_layers=1 --config.model.dtype=bfloat16 \
        --config.model.remat=True --steps=5 ;;
    peer_sd)
      local channels size batch sd=/tmp/random_sd_unet
      read -r channels size batch <<< "${SD_PEER:-320,640,1280,1280 64 8}"
      timeout 300 "$PYTHON" -c 'import sys, diffusers, torch
torch.manual_seed(0)
channels = tuple(map(int, sys.argv[1].split(",")))
diffusers.UNet2DConditionModel(sample_size=int(sys.argv[2]), in_channels=3, out_channels=3, cross_attention_dim=768,
                               block_out_channels=channels).save_pretrained(sys.argv[3])' \
        "$channels" "$size" "$sd" >> "$OUT/gpu_bench.log" 2>&1
      bench 400 peer --config=configs/t2i_shapes.py --config.model.backbone=sd_unet --config.model.sd_unet_path=$sd \
        --config.data.resolution="$size" --config.train.batch_size="$batch" --config.text.max_length=77 \
        --config.text.trainable=False --config.text.t5.d_model=768 --config.text.t5.num_layers=1 \
        --config.model.dtype=bfloat16 --steps=5 ;;
    video)
      local video=(--config=configs/t2v_moving_shapes.py:dit --config.data.frames=16 --config.model.max_frames=16
                   --config.data.resolution=32 --config.model.dtype=bfloat16 --widths=96 --steps=10)
      bench 120 step "${video[@]}" --config.model.video_attention=factorised
      bench 120 step "${video[@]}" --config.model.video_attention=spacetime
      bench 120 step "${video[@]}" --config.model.video_attention=spacetime --config.model.temporal_patch_size=2 ;;
    compile)
      bench 240 compile --config=configs/t2i_shapes.py --steps=10 --repeats=1 ;;
    profile)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" bench 180 profile --config=configs/t2i_shapes.py \
        --config.data.resolution=64 --config.model.dtype=bfloat16 --config.model.channels=128 \
        --config.train.batch_size=128 --steps=5 ;;
    *)
      echo "error: no benchmark named '$1' (env, step, attention, base64, remat, peer_dit, peer_unet, peer_wan," \
        "peer_sd, video, compile, profile)" >&2
      exit 2 ;;
  esac
}

for name in "${@:-env step attention peer_dit peer_unet video compile profile}"; do
  for each in $name; do run "$each"; done
done
echo "wrote $OUT/gpu_bench.md and $OUT/gpu_bench.log" >&2
