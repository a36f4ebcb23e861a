#!/usr/bin/env bash
# A whole ELM forest on ../shared/corpus from the `elmforest` command line, on CPU:
# a seed on the balanced mixture of the 8 train domains, 8 branches, 8 trained ELMs in a
# forest, then evaluation, a posterior-weighted average for an unseen domain, and a check
# that every ELM directory loads with transformers' AutoModelForCausalLM and generates.
#
# The first four ELMs branch from the seed (the forest is empty); the last four branch from
# the posterior-weighted average of the ELMs already in the forest (incremental BTM).
#
#   bash bench/forest_from_cli.sh                      # ~15 minutes on 2 CPU cores
#   CORPUS=DIR OUT=runs/cli-forest PRESET=mini SEED_STEPS=300 ELM_STEPS=150 bash bench/forest_from_cli.sh
set -euo pipefail
cd "$(dirname "$0")/.."

EF=${EF:-.venv/bin/elmforest}
PY=${PY:-.venv/bin/python}
CORPUS=${CORPUS:-../shared/corpus}
OUT=${OUT:-runs/cli-forest}
PRESET=${PRESET:-mini}
VOCAB=${VOCAB:-4096}
BLOCK=${BLOCK:-128}
SEED_STEPS=${SEED_STEPS:-300}
ELM_STEPS=${ELM_STEPS:-150}
DOMAINS=(python linux_c licenses kjv_bible webster_dictionary fortunes manpages postgres_docs)

t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
mkdir -p "$OUT"

stamp "seed: $PRESET preset, BPE vocab $VOCAB, $SEED_STEPS updates of 32 x $BLOCK on the 8 train domains"
$EF seed --corpus "$CORPUS" --out "$OUT/seed" --preset "$PRESET" --vocab-size "$VOCAB" \
  --steps "$SEED_STEPS" --batch-size 32 --block-size "$BLOCK" --lr 2e-3 --no-progress
[ -f "$OUT/forest/forest.json" ] || $EF forest init "$OUT/forest" --seed "$OUT/seed"

for i in "${!DOMAINS[@]}"; do
  d=${DOMAINS[$i]}
  if $EF forest list "$OUT/forest" | grep -qw "$d"; then continue; fi
  stamp "branch $d (posterior over the forest's current ELMs; the seed when there are none)"
  $EF branch --forest "$OUT/forest" --sample "$CORPUS/$d/valid.jsonl" --domain "$d" \
    --out "$OUT/init-$d" --block-size "$BLOCK"
  stamp "train $d: $ELM_STEPS updates of 16 x $BLOCK on $d alone"
  $EF train --init "$OUT/init-$d" --corpus "$CORPUS" --domain "$d" --out "$OUT/elm-$d" \
    --steps "$ELM_STEPS" --batch-size 16 --block-size "$BLOCK" --lr 2e-3 --no-progress
  # the first four are added together (they all branched from the seed), then one at a time
  if [ "$i" -eq 3 ]; then
    for e in "${DOMAINS[@]:0:4}"; do $EF forest add "$OUT/forest" "$OUT/elm-$e"; done
  elif [ "$i" -gt 3 ]; then
    $EF forest add "$OUT/forest" "$OUT/elm-$d"
  fi
done
$EF forest list "$OUT/forest"
$EF forest verify "$OUT/forest"

stamp "evaluate every ELM, the ensemble and the averages on the 12 domains"
$EF eval --forest "$OUT/forest" --corpus "$CORPUS" --block-size "$BLOCK" --max-eval-blocks 32 \
  --json "$OUT/eval.json"

stamp "posterior-weighted average for the unseen domain go"
$EF average --forest "$OUT/forest" --target "$CORPUS/go/valid.jsonl" --out "$OUT/avg-go" --block-size "$BLOCK"

stamp "every ELM loads with AutoModelForCausalLM and generates"
$PY - "$OUT" "${DOMAINS[@]}" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out, domains = Path(sys.argv[1]), sys.argv[2:]
prompts = {"python": "def ", "linux_c": "static int ", "licenses": "Permission is ",
           "kjv_bible": "And the LORD ", "webster_dictionary": "Water (n.)",
           "fortunes": "A man ", "manpages": "NAME\n", "postgres_docs": "The SELECT "}
for d in domains + ["avg-go"]:
    path = out / (d if d.startswith("avg") else f"elm-{d}")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok(prompts.get(d, "package main\n"), return_tensors="pt").input_ids
    torch.manual_seed(0)
    gen = model.generate(ids, max_new_tokens=24, do_sample=True, top_k=40, pad_token_id=tok.pad_token_id)
    text = tok.decode(gen[0], skip_special_tokens=True)
    assert len(gen[0]) > len(ids[0]), f"{path} generated nothing"
    print(f"{path}: {text!r}")
EOF
stamp "done: forest in $OUT/forest"
