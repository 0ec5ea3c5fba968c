#!/usr/bin/env bash
# Experiment d: a start model that often answers with junk (an empty box, wrong for every prompt).
#   bash course/run_junk_experiment.sh [RUNS_DIR] [SEEDS...]       (defaults: runs/junk, seeds 0 1 2)
# Per seed: builds the junk variant of the CPU task (tiny_task.py --junk 0.5 --answers-alone 0.25, task seed =
# training seed), trains GRPO, NSR-PreRL, DSRL and PSR-PreRL with the task's flags, evaluates the start model and
# every final checkpoint (eval.py accuracy --k 8 on the held-out phrasings) and measures the gradient alignment
# of log P(y|x) and log P(y) before and after training (eval.py align). Then course/junk_summary.py prints the
# tables. One thread per process (see run_experiments.sh); each seed's wall time lands in SEED/wall_s.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/junk}
shift || true
SEEDS=${*:-0 1 2}
THREADS=${THREADS:-1}
[ "$THREADS" = default ] || export OMP_NUM_THREADS=$THREADS
MODES="grpo nsr-prerl dsrl psr-prerl"

evaluate() {  # evaluate MODEL_DIR OUT_DIR TASK: pass@k on the held-out phrasings, and the gradient alignment
  python eval.py accuracy --model "$1" --benchmarks "$3/test.jsonl" --k 8 --max-new-tokens 12 --device cpu \
    --output "$2/eval" > "$2/eval.log" 2>&1
  python eval.py align --model "$1" --benchmark "$3/test.jsonl" --rollouts 40 --max-new-tokens 12 --chunk 16 \
    --device cpu --output "$2/align" > "$2/align.log" 2>&1
}

for seed in $SEEDS; do
  dir="$RUNS/seed$seed"
  t0=$(date +%s)
  mkdir -p "$dir/start"
  [ -f "$dir/task/train_flags.txt" ] || python course/tiny_task.py "$dir/task" --seed "$seed" --junk 0.5 \
    --answers-alone 0.25 > "$dir/task.log" 2>&1
  steps=$(sed -E 's/.*--steps ([0-9]+).*/\1/' "$dir/task/train_flags.txt")
  evaluate "$dir/task/model" "$dir/start" "$dir/task"
  for mode in $MODES; do
    rm -rf "${dir:?}/$mode"
    python dsrl.py --model "$dir/task/model" --dataset "$dir/task/train.jsonl" $(cat "$dir/task/train_flags.txt") \
      --mode "$mode" --seed "$seed" $([ "$mode" = dsrl ] && echo --warmup-steps 19) --output-dir "$dir/$mode" \
      > "$dir/$mode.log" 2>&1
    evaluate "$dir/$mode/checkpoint-$steps" "$dir/$mode" "$dir/task"
  done
  echo $(( $(date +%s) - t0 )) > "$dir/wall_s.txt"
  echo "seed $seed: $(cat "$dir/wall_s.txt") s"
done
python course/junk_summary.py "$RUNS"
