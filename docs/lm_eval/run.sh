#!/usr/bin/env bash
# Score `labkit serve` with lm-evaluation-harness's local-completions model on the offline tasks in this folder
# (docs/openai.md, "Scoring with lm-evaluation-harness"). lm-eval is not a labkit dependency: it gets a venv of
# its own, made once under runs/lm-eval/venv. Starts the server on a free port, runs lm_eval, stops the server.
#
#   docs/lm_eval/run.sh [TASKS]        # default labkit_mc,labkit_gen; `make lm-eval` runs this
#
# Environment: LABKIT_PYTHON (default .venv/bin/python), LM_EVAL_VENV (default runs/lm-eval/venv), MODEL (what
# `labkit serve --model` takes; default the embedded smollm2-135m-instruct), TOKENIZER (a local tokenizer folder
# or hub id; default the embedded model's converted folder), LM_EVAL_ARGS (more lm_eval arguments, e.g. --limit 5).
set -euo pipefail
cd "$(dirname "$0")/../.."

tasks=${1:-labkit_mc,labkit_gen}
python=${LABKIT_PYTHON:-.venv/bin/python}
venv=${LM_EVAL_VENV:-runs/lm-eval/venv}
model=${MODEL:-smollm2-135m-instruct}
[ -x "$python" ] || { echo "run.sh: no labkit python at $python (run 'make setup' or set LABKIT_PYTHON)" >&2; exit 2; }

if [ ! -x "$venv/bin/lm_eval" ]; then
  python3 -m venv "$venv"
  # the CPU wheel first: lm-eval's dependencies would otherwise pull a multi-GB CUDA build of torch
  "$venv/bin/pip" install -q torch==2.13.0
  # transformers: lm-eval splits context and continuation with the server's tokenizer (tokenizer_backend=huggingface)
  "$venv/bin/pip" install -q "lm-eval[api]==0.4.13" transformers accelerate
fi

mkdir -p runs/lm-eval
out=$(mktemp -d "runs/lm-eval/$(date -u +%Y%m%dT%H%M%SZ)-XXXX")
log=$out/serve.log
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$python" -m labkit serve --model "$model" --port 0 >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
url=
for _ in $(seq 240); do  # up to 2 minutes: the first start converts the embedded model
  kill -0 "$server" 2>/dev/null || { echo "run.sh: labkit serve exited; its log:" >&2; cat "$log" >&2; exit 1; }
  url=$(sed -n 's/^labkit serve: .* on \(http:[^ ]*\) .*/\1/p' "$log")
  [ -n "$url" ] && curl -sf "$url/health" >/dev/null && break
  url=; sleep 0.5
done
[ -n "$url" ] || { echo "run.sh: labkit serve not healthy after 2 minutes; its log:" >&2; cat "$log" >&2; exit 1; }

tokenizer=${TOKENIZER:-$model}
if [ "$model" = smollm2-135m-instruct ] && [ -z "${TOKENIZER:-}" ]; then
  tokenizer=$("$python" -c "from labkit.model.loader import cache_dir; print(cache_dir() / '$model')")
fi
model_args=model=$model,base_url=$url/v1/completions,tokenizer_backend=huggingface,tokenizer=$tokenizer
model_args+=,num_concurrent=1,max_retries=1  # one request at a time; a failed one stops the run
echo "run.sh: lm_eval $tasks against $model at $url (tokenizer $tokenizer), results in $out"
# shellcheck disable=SC2086  # LM_EVAL_ARGS is a list of arguments
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$venv/bin/lm_eval" run --model local-completions \
  --model_args "$model_args" \
  --tasks "$tasks" --include_path docs/lm_eval --output_path "$out" --log_samples ${LM_EVAL_ARGS:-}
