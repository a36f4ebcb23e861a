"""Training throughput of the btm loop against Hugging Face `Trainer`, same model, data and batch.

Both train the same freshly initialised model on the same balanced-mixture batches with the
same AdamW settings and schedule; we time the updates after a warm-up and print tokens/s of
each and the ratio (goal on CPU: ours / Trainer >= 1.0). On a GPU it also prints MFU
(6 * parameters * tokens/s over the chip's peak bf16 FLOP/s).

    python bench/train_throughput.py                       # CPU, the `small` preset
    python bench/train_throughput.py --preset gpt2-125m --batch 32 --block 1024 --steps 60   # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--corpus", type=Path, default=ROOT / "btm" / "demo_corpus")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup-steps", type=int, default=5, help="updates excluded from the timing")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each; the best of each counts")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 dense TFLOP/s of the GPU (H100 SXM: 989)")
    args = ap.parse_args()

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from btm.data import BlockSampler, Corpus, tokenize_file
    from btm.family import Card, new_model, preset_config
    from btm.tokenizer import iter_balanced_texts, train_bpe
    from btm.train import TrainConfig, train

    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    corpus = Corpus(args.corpus)
    names = corpus.names("train") or corpus.names()
    tok = train_bpe(iter_balanced_texts({n: corpus[n].documents("train") for n in names}, 500_000), args.vocab_size)
    sampler = BlockSampler([tokenize_file(corpus[n].split_path("train"), tok, work / "cache") for n in names], args.block)
    cuda = torch.cuda.is_available()
    tokens_per_step = args.batch * args.block

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, block_size=args.block, progress=False, log_every=1,
                      compile=args.compile)
    n_params = sum(p.numel() for p in new_model(preset_config(args.preset, tok), seed=0).parameters())

    def rate(stamps: list[float]) -> float:
        return (len(stamps) - 1 - args.warmup_steps) * tokens_per_step / (stamps[-1] - stamps[args.warmup_steps])

    def ours(i: int) -> float:
        stamps: list[float] = []
        train(new_model(preset_config(args.preset, tok), seed=0), tok, sampler, cfg, work / f"ours{i}", Card(name="ours"),
              on_step=lambda step, rec: stamps.append(time.perf_counter()))
        return rate(stamps)

    # ---- Hugging Face Trainer on the same batches
    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return args.steps * args.batch

        def __getitem__(self, i):
            step, row = divmod(i, args.batch)
            x = sampler.batch(step, args.batch)[row]
            return {"input_ids": x[:-1], "labels": x[:-1]}

    def hf(i: int) -> float:
        stamps: list[float] = []

        class Clock(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                if cuda:
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

        targs = TrainingArguments(
            output_dir=str(work / f"hf{i}"), per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=cfg.lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.beta1, adam_beta2=cfg.beta2,
            warmup_steps=cfg.warmup, lr_scheduler_type="linear", max_grad_norm=cfg.grad_clip, logging_strategy="no",
            save_strategy="no", report_to=[], dataloader_num_workers=0, bf16=cuda, use_cpu=not cuda,
            disable_tqdm=True, torch_compile=args.compile,
        )
        Trainer(model=new_model(preset_config(args.preset, tok), seed=0), args=targs, train_dataset=Batches(),
                callbacks=[Clock()]).train()
        return rate(stamps)

    # alternate the two so that neither gets the quieter minutes; keep each one's best
    runs = {"ours": [], "hf": []}
    for i in range(args.rounds):
        runs["ours"].append(ours(i))
        runs["hf"].append(hf(i))
    ours_tps, hf_tps = max(runs["ours"]), max(runs["hf"])

    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.preset}: {n_params / 1e6:.1f}M parameters; batch {args.batch} x {args.block} tokens; {device}")
    print(f"btm loop           {ours_tps:>12,.0f} tokens/s   (runs: {', '.join(f'{x:,.0f}' for x in runs['ours'])})")
    print(f"HF Trainer         {hf_tps:>12,.0f} tokens/s   (runs: {', '.join(f'{x:,.0f}' for x in runs['hf'])})")
    print(f"ratio btm/Trainer  {ours_tps / hf_tps:>12.2f}")
    out = {"preset": args.preset, "device": device, "params": n_params, "tokens_per_s": round(ours_tps),
           "trainer_tokens_per_s": round(hf_tps), "ratio": round(ours_tps / hf_tps, 3)}
    if cuda:
        mfu = 6 * n_params * ours_tps / (args.peak_tflops * 1e12)
        print(f"MFU                {mfu:>12.1%}")
        out["mfu"] = round(mfu, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
