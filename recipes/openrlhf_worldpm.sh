#!/usr/bin/env bash
# OpenRLHF (0.11.x) PPO / REINFORCE++ / GRPO on Ray, with WorldPM-72B as the remote reward.
#
# What it does: starts WorldPM-72B on its own GPUs (the batching HTTP server, or a Ray Serve
# deployment), starts a Ray head, and submits OpenRLHF's train_ppo_ray with
# --reward.remote_url pointing at the reward host. Rollout actors send one sample per
# request as soon as it is generated; the server batches them across requests.
#
# Hardware plan (not run here: the trainer needs vLLM and GPUs): one 8x80GB node.
#   GPUs 4-7: WorldPM-72B in bf16 (~143 GB, device_map auto), `worldpm-reward serve`.
#   GPUs 0-3: actor, reference, critic and 4 vLLM engines colocated (--train.colocate_all,
#             sleep mode), a 7B policy with ZeRO-3.
#   FP8 WorldPM (~72 GB) would fit on 1-2 GPUs and free the others for training.
# Tested here: every train_ppo_ray flag below is checked against the installed OpenRLHF's
# parser, and the reward URL and reward-function file are exercised against a live server
# (tests/recipes/test_recipes.py).
#
# Usage:
#   ALGO=ppo          bash recipes/openrlhf_worldpm.sh   # PPO with a critic (GAE)
#   ALGO=reinforce_pp bash recipes/openrlhf_worldpm.sh   # REINFORCE++
#   ALGO=grpo         bash recipes/openrlhf_worldpm.sh   # GRPO (group-normalized advantages)
#   REWARD_HOST=ray-serve ...                             # WorldPM as a Ray Serve app instead of the server
#   REWARD_CALL=file ...                                  # through the reward-function file (bearer token)
# CPU smoke (what CI checks): python -m pytest tests/recipes/test_recipes.py -k openrlhf
set -euo pipefail

ALGO=${ALGO:-ppo}
POLICY=${POLICY:-Qwen/Qwen2.5-7B-Instruct}
RM=${RM:-Qwen/WorldPM-72B}
RM_GPUS=${RM_GPUS:-4,5,6,7}          # the reward server's GPUs (REWARD_HOST=server)
TRAIN_GPUS=${TRAIN_GPUS:-0,1,2,3}    # the only GPUs Ray (and so OpenRLHF) may use beside it
N_RM_GPUS=$(echo "$RM_GPUS" | tr ',' '\n' | grep -c .)
N_TRAIN_GPUS=$(echo "$TRAIN_GPUS" | tr ',' '\n' | grep -c .)
RM_PORT=${RM_PORT:-8000}
REWARD_HOST=${REWARD_HOST:-server}      # server | ray-serve
REWARD_CALL=${REWARD_CALL:-http}        # http | file
PROMPTS=${PROMPTS:-$(cd "$(dirname "$0")/.." && pwd)/../shared/data/prompts/alpaca_eval_805_instructions.jsonl}
SAVE=${SAVE:-./ckpt/openrlhf-worldpm-${ALGO}}
if [ "$REWARD_CALL" = "file" ]; then
  # the reward-function file sends a bearer token; the server reads it from this variable
  export WORLDPM_REWARD_TOKEN=${WORLDPM_REWARD_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}
else
  unset WORLDPM_REWARD_TOKEN  # OpenRLHF's own HTTP client sends no token
fi

# 1. the reward model on its own GPUs ------------------------------------------------------
if [ "$REWARD_HOST" = "server" ]; then
  # --fallback-reward: an unscorable sample gets a low reward (flagged in extra_logs) instead
  # of a 422 that OpenRLHF retries and then turns into a crashed step; --openrlhf-scores
  # sigmoid keeps `scores` in (0, 1) for --algo.dynamic_filtering_enable.
  CUDA_VISIBLE_DEVICES=$RM_GPUS nohup worldpm-reward serve --model "$RM" --device-map auto \
      --host 127.0.0.1 --port "$RM_PORT" --normalize running --clip-min -5 --clip-max 5 \
      --fallback-reward -5 --openrlhf-scores sigmoid > reward_server.log 2>&1 &
  until curl -sf "http://127.0.0.1:$RM_PORT/health" > /dev/null; do sleep 10; done
  RM_URL="http://127.0.0.1:$RM_PORT"
fi

# 2. the Ray cluster (training GPUs only when the server holds the others) --------------------
if [ "$REWARD_HOST" = "server" ]; then
  # Ray sees only the training GPUs: nothing it schedules can land on the server's GPUs
  CUDA_VISIBLE_DEVICES=$TRAIN_GPUS ray start --head --port 6379 --dashboard-host 127.0.0.1 \
      --num-gpus "$N_TRAIN_GPUS"
else
  # the reward is a Ray actor too: Ray sees every GPU and places the Serve replica (which
  # asks for N_RM_GPUS) and OpenRLHF's actors (which ask for the rest) on different ones
  ray start --head --port 6379 --dashboard-host 127.0.0.1
fi
if [ "$REWARD_HOST" = "ray-serve" ]; then
  worldpm-reward-ray --model "$RM" --num-gpus "$N_RM_GPUS" --model-kwargs '{"device_map": "auto"}' \
      --address auto --host 127.0.0.1 --port "$RM_PORT" --name worldpm
  RM_URL="http://127.0.0.1:$RM_PORT"
fi

# 3. how OpenRLHF reaches the reward -------------------------------------------------------
if [ "$REWARD_CALL" = "file" ]; then
  REMOTE="$(worldpm-reward openrlhf-file)"
  ENV_JSON="{\"env_vars\": {\"WORLDPM_REWARD_URL\": \"$RM_URL\", \"WORLDPM_REWARD_TOKEN\": \"$WORLDPM_REWARD_TOKEN\"}}"
else
  # the plain URL: OpenRLHF's client sends no token, so keep the server on 127.0.0.1
  REMOTE="$RM_URL/get_reward"
  ENV_JSON="{}"
fi

case "$ALGO" in
  ppo)          ALGO_ARGS=(--algo.advantage.estimator gae --critic.model_name_or_path "$POLICY"
                           --critic.num_nodes 1 --critic.num_gpus_per_node 4 --critic.adam.lr 9e-6) ;;
  reinforce_pp) ALGO_ARGS=(--algo.advantage.estimator reinforce --algo.kl.init_coef 0.01) ;;
  grpo)         ALGO_ARGS=(--algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 8
                           --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef 0.001) ;;
  *) echo "ALGO must be ppo, reinforce_pp or grpo" >&2; exit 2 ;;
esac

# 4. the training job ----------------------------------------------------------------------
ray job submit --address http://127.0.0.1:8265 --runtime-env-json="$ENV_JSON" \
  -- python3 -m openrlhf.cli.train_ppo_ray \
  --ref.num_nodes 1 --ref.num_gpus_per_node 4 \
  --actor.num_nodes 1 --actor.num_gpus_per_node 4 \
  --vllm.num_engines 4 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.5 \
  --train.colocate_all --vllm.enable_sleep --ds.enable_sleep \
  --actor.model_name_or_path "$POLICY" \
  --reward.remote_url "$REMOTE" \
  --ckpt.output_dir "$SAVE" --ckpt.save_steps 50 --logger.logging_steps 1 \
  --train.micro_batch_size 4 --train.batch_size 128 \
  --rollout.micro_batch_size 8 --rollout.batch_size 128 \
  --train.max_epochs 1 --train.num_episodes 1 \
  --data.max_len 4096 --rollout.max_new_tokens 1024 --data.max_samples 100000 \
  --ds.zero_stage 3 --ds.param_dtype bf16 \
  --actor.adam.lr 5e-7 \
  --data.prompt_dataset "$PROMPTS" --data.input_key instruction --data.apply_chat_template \
  --actor.gradient_checkpointing_enable --ds.packing_samples \
  "${ALGO_ARGS[@]}"
