#!/usr/bin/env bash
# The course's three CPU experiments on the tiny task, one run at a time (about 2.5 minutes, one thread).
#   bash course/run_experiments.sh [TASK_DIR] [RUNS_DIR]      (defaults: runs/course/task, runs/course)
# Builds the task if TASK_DIR has none, trains 7 runs of dsrl.py, evaluates every final checkpoint with
# eval.py accuracy, draws the GRPO-vs-DSRL curves and prints the tables (course/summarize.py).
# Runs on ONE thread by default: the model is so small that a second thread buys little, and on a busy machine
# (another process on one of 2 cores) torch's default 2 threads made a run 10-20x slower.
# THREADS=default keeps torch's default, THREADS=N sets N.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:-runs/course/task}
RUNS=${2:-runs/course}
mkdir -p "$RUNS"
THREADS=${THREADS:-1}
[ "$THREADS" = default ] || export OMP_NUM_THREADS=$THREADS

[ -f "$TASK/train_flags.txt" ] || python course/tiny_task.py "$TASK"
FLAGS=$(cat "$TASK/train_flags.txt")
STEPS=$(sed -E 's/.*--steps ([0-9]+).*/\1/' "$TASK/train_flags.txt")

train() {  # train NAME MODE [extra flags]: one dsrl.py run, its wall time in NAME/wall_s.txt
  local name=$1 mode=$2; shift 2
  rm -rf "$RUNS/$name"
  local t0; t0=$(date +%s.%N)
  python dsrl.py --model "$TASK/model" --dataset "$TASK/train.jsonl" $FLAGS --mode "$mode" "$@" \
    --output-dir "$RUNS/$name" > "$RUNS/$name.log" 2>&1
  python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)" \
    > "$RUNS/$name/wall_s.txt"
  echo "$name: $(cat "$RUNS/$name/wall_s.txt") s"
}

evaluate() {  # evaluate NAME MODEL_DIR: pass@k etc. on the held-out phrasings (test) and the train problems
  python eval.py accuracy --model "$2" --benchmarks "$TASK/test.jsonl,$TASK/train.jsonl" --k 8 \
    --max-new-tokens 12 --device cpu --output "$RUNS/$1/eval" > "$RUNS/$1.eval.log" 2>&1
}

# a. the four losses (dsrl: --warmup-steps of the flags line, 5)
train grpo grpo
train dsrl dsrl
train nsr-prerl nsr-prerl
train psr-prerl psr-prerl
# b. warm-up length (W = 5 is the dsrl run above)
train dsrl-w0 dsrl --warmup-steps 0
train dsrl-w19 dsrl --warmup-steps 19
# c. the same negative samples with the prompt (P(y|x)) and without it (P(y): nsr-prerl above)
train nsr-rl nsr-rl

mkdir -p "$RUNS/start"
evaluate start "$TASK/model"
for run in grpo dsrl nsr-prerl psr-prerl dsrl-w0 dsrl-w19 nsr-rl; do
  evaluate "$run" "$RUNS/$run/checkpoint-$STEPS"
done

python eval.py plot "$RUNS/grpo" "$RUNS/dsrl" --out "$RUNS/plots"
python course/summarize.py "$RUNS"
