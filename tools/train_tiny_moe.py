"""Train the built-in tiny Qwen3-MoE model (gmmquant/assets/tiny-moe) from text that ships with CPython.

    python tools/train_tiny_moe.py --out gmmquant/assets/tiny-moe     # defaults produce the shipped asset

Corpus: training = the "train" pydoc topics of `gmmquant.calibrate.corpus` (repeated --topic-repeat times)
plus the docstrings of the stdlib's .py files (ast, sorted walk, tests/idlelib/... skipped, paragraphs that
also occur in the held-out topics dropped, capped at --docstring-chars). Held-out = the "heldout" topics
only. Tokenizer: byte-level BPE trained with `tokenizers` on the training text, saved as a
PreTrainedTokenizerFast. Model: Qwen3MoeForCausalLM trained in float32 with AdamW (warmup + cosine) on
random windows of the training token stream, with a Switch load-balancing loss computed per layer (see
`balance_loss`); saved in bfloat16 with save_pretrained. The script reports the held-out perplexity of the saved model reloaded (weights bf16,
computed in float32: the protocol of `gmmquant.calibrate.perplexity`) and of a unigram model fitted on the
training tokens (add-one smoothing) on the same held-out tokens.

Defaults (the shipped asset): 4 layers, hidden 128, 8 experts top-2, moe_intermediate 256, 4 heads x 32
(2 kv heads), vocab 4096, tied embeddings; 1500 steps of 8 x 256 tokens, lr 3e-3, seed 0, 1 thread.
On the shared 2-core VM this took 1061 s of training (~0.7 s/step when the other core is busy elsewhere);
held-out perplexity 32.27 vs 793.95 for the unigram baseline.

`--preset hard` (the harder quality benchmark, gmmquant/assets/tiny-moe-hard, builtin name "builtin-hard"):

    python tools/train_tiny_moe.py --preset hard --out gmmquant/assets/tiny-moe-hard

hidden 256, 16 experts of 128 top-4, 4 heads x 64 (2 kv heads), 1200 steps, the same corpus, tokenizer
recipe and seed; then `plant_outliers` gives every MoE input 4 outlier channels (20-50x, function-preserving)
before the bf16 save. Training time, perplexity and outlier statistics: README, "Quality on the built-in models".
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gmmquant.calibrate.corpus import builtin_documents  # noqa: E402
from gmmquant.calibrate.data import token_stream  # noqa: E402
from gmmquant.calibrate.perplexity import perplexity, windows  # noqa: E402

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SKIP_DIRS = {
    "test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo",
    "ensurepip", "lib2to3", "config-3", "tkinter", "msilib", "venv", "__phello__", "encodings",
}


def _norm(paragraph: str) -> str:
    return " ".join(paragraph.split())


def _paragraphs(text: str) -> list[str]:
    return [p for p in (p.strip() for p in text.split("\n\n")) if p]


def stdlib_docstrings(max_chars: int, exclude: set[str]) -> list[str]:
    """Docstrings of the stdlib's modules, classes and functions, one document per module.

    Deterministic: files in sorted order, nodes in source order. A paragraph whose normalised text is in
    `exclude` or was already taken is dropped. Stops once `max_chars` characters were collected.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(("test", "config-")))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    seen = set(exclude)
    docs: list[str] = []
    total = 0
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts: list[str] = []
        for node in [tree, *ast.walk(tree)]:
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node is not tree and isinstance(node, ast.Module):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            for para in _paragraphs(doc):
                key = _norm(para)
                if len(key) < 20 or key in seen:
                    continue
                seen.add(key)
                parts.append(para)
        if not parts:
            continue
        text = "\n\n".join(parts)
        if total + len(text) > max_chars:
            text = text[: max_chars - total]
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs


def build_corpus(docstring_chars: int, topic_repeat: int) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents)."""
    heldout = builtin_documents("heldout")
    exclude = {_norm(p) for doc in heldout for p in _paragraphs(doc)}
    train_topics = builtin_documents("train")
    docstrings = stdlib_docstrings(docstring_chars, exclude)
    return train_topics * topic_repeat + docstrings, heldout


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=None,
        pad_token=PAD,
    )


def balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss, per layer, averaged over layers.

    transformers' `load_balancing_loss_func` pools the router logits of all layers before counting, so it
    balances expert *indices* across layers and lets one layer starve an expert that another layer overuses;
    calling it on each layer alone balances every layer. Perfect balance gives `top_k`.
    """
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    losses = [load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits]
    return torch.stack(losses).mean()


def unigram_perplexity(train_ids: torch.Tensor, eval_windows: list[list[int]], vocab_size: int) -> float:
    """Add-one-smoothed unigram fitted on `train_ids`, scored on the tokens `perplexity()` predicts."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    targets = torch.tensor([t for w in eval_windows for t in w[1:]], dtype=torch.long)
    return math.exp(-float(logp[targets].mean()))


# Named configurations; `--preset NAME` sets these defaults, explicit flags still override them.
# "tiny" is the shipped gmmquant/assets/tiny-moe. "hard" is the harder quality benchmark (builtin name
# "hard"): hidden 256, 16 finer experts (128 wide, top-4) and planted activation outliers on the MoE inputs.
PRESETS: dict[str, dict] = {
    "tiny": {},
    "hard": {
        "hidden_size": 256, "moe_intermediate_size": 128, "num_experts": 16, "top_k": 4,
        "num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "steps": 1200,
        "outlier_channels": 4, "outlier_scale_min": 20.0, "outlier_scale_max": 50.0,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="named configuration (defaults below are 'tiny'; explicit flags override the preset)")
    p.add_argument("--out", type=Path, required=True, help="output dir (model + tokenizer)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--moe-intermediate-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--aux-loss-coef", type=float, default=0.02)
    p.add_argument("--docstring-chars", type=int, default=3_000_000, help="cap on the stdlib docstring text")
    p.add_argument("--topic-repeat", type=int, default=2, help="times the train topics enter the corpus")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core VM, 2 threads oversubscribed run 3x slower)")
    p.add_argument("--experts-implementation", default="grouped_mm", help="transformers experts kernel for training")
    p.add_argument("--autocast-bf16", action="store_true", help="bf16 autocast for the forward pass")
    p.add_argument("--eval-max-windows", type=int, default=None, help="held-out windows to score (None: all)")
    p.add_argument("--outlier-channels", type=int, default=0,
                   help="after training, plant this many outlier channels per MoE input (see plant_outliers; 0: none)")
    p.add_argument("--outlier-scale-min", type=float, default=20.0)
    p.add_argument("--outlier-scale-max", type=float, default=50.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--monitor-every", type=int, default=200,
                   help="log the held-out perplexity of the first 32 windows every N steps (monitoring only; 0: off)")
    pre, _ = p.parse_known_args(argv)
    p.set_defaults(**PRESETS[pre.preset])
    return p.parse_args(argv)


@torch.no_grad()
def plant_outliers(model, channels: int, scale_min: float, scale_max: float, seed: int) -> list[dict]:
    """Give the MoE inputs the activation outliers of trained LLMs without changing the model's function.

    Small models trained briefly do not grow the few huge input channels that large LLMs have, and those
    channels are what make low-bit weight quantization hard (a weight row that multiplies a 30x activation
    matters 30x more). Per MoE layer, `channels` channels c of the post-attention RMSNorm weight are
    multiplied by s (log-uniform in [scale_min, scale_max]) and column c of the router and of every expert's
    gate/up projection is divided by s: exact in real arithmetic, so the float model is unchanged up to
    rounding (call this in float32, before casting). Channels and factors come from `seed`.

    Returns: per layer, the channels and factors planted.
    """
    gen = torch.Generator().manual_seed(seed + 1000)
    planted = []
    for i, layer in enumerate(model.model.layers):
        hidden = layer.post_attention_layernorm.weight.numel()
        idx = torch.randperm(hidden, generator=gen)[:channels].sort().values
        logs = torch.rand(channels, generator=gen, dtype=torch.float64)
        factors = torch.exp(math.log(scale_min) + logs * (math.log(scale_max) - math.log(scale_min)))
        f = factors.to(torch.float32)
        layer.post_attention_layernorm.weight[idx] *= f
        layer.mlp.gate.weight[:, idx] /= f
        layer.mlp.experts.gate_up_proj[:, :, idx] /= f
        planted.append({"layer": i, "channels": idx.tolist(), "factors": [round(float(x), 3) for x in factors]})
    return planted


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    train_docs, heldout_docs = build_corpus(args.docstring_chars, args.topic_repeat)
    n_chars = sum(map(len, train_docs))
    print(f"corpus: {len(train_docs)} training documents, {n_chars} chars; held-out {len(heldout_docs)} documents", flush=True)
    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    vocab = len(tokenizer)
    train_ids = token_stream(tokenizer, train_docs)
    print(f"tokenizer: vocab {vocab}; training stream {train_ids.numel()} tokens ({time.time() - t0:.1f}s)", flush=True)

    config = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=args.hidden_size,
        intermediate_size=args.moe_intermediate_size,  # unused (no dense MLP layer) but kept consistent
        moe_intermediate_size=args.moe_intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=True,
        output_router_logits=False,  # training asks for the router logits per call (see balance_loss)
        router_aux_loss_coef=args.aux_loss_coef,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    model = Qwen3MoeForCausalLM(config)
    # grouped_mm experts train ~10% faster than the eager per-expert loop on CPU (bf16 autocast is ~20x slower)
    model.set_experts_implementation(args.experts_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    span = args.seq_len + 1
    if train_ids.numel() <= span:
        raise ValueError("training stream shorter than one window")
    model.train()
    losses: list[float] = []
    t_train = time.time()
    ema = None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, train_ids.numel() - span + 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast_bf16):
            out = model(input_ids=batch, output_router_logits=True)
            lm = model.loss_function(out.logits, batch, vocab)
        aux = balance_loss(out.router_logits, args.num_experts, args.top_k)
        loss = lm + args.aux_loss_coef * aux
        lm_loss = lm.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(lm_loss)
        ema = lm_loss if ema is None else 0.95 * ema + 0.05 * lm_loss
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step:5d}  lm loss {lm_loss:.4f}  ema {ema:.4f}  aux {aux.item():.3f}  "
                  f"lr {lr_at(step):.2e}  {el:.0f}s", flush=True)
        if args.monitor_every and step > 0 and step % args.monitor_every == 0:
            mon = perplexity(model, tokenizer, heldout_docs, args.seq_len, max_windows=32)
            print(f"step {step:5d}  held-out perplexity (32 windows, monitoring only) {mon:.2f}", flush=True)
    train_time = time.time() - t_train

    planted = []
    if args.outlier_channels:
        model.eval()
        probe = torch.tensor([train_ids[: args.seq_len].tolist()])
        before = model(input_ids=probe).logits
        planted = plant_outliers(model, args.outlier_channels, args.outlier_scale_min, args.outlier_scale_max, args.seed)
        drift = (model(input_ids=probe).logits - before).abs().max().item()
        print(f"planted outliers {json.dumps(planted)}; max logit change (float32) {drift:.2e}", flush=True)

    # save in bf16
    model.to(torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())

    # evaluate the saved model, reloaded: bf16 weights, float32 compute
    saved = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    saved_tok = AutoTokenizer.from_pretrained(args.out)
    ppl = perplexity(saved, saved_tok, heldout_docs, args.seq_len, args.eval_max_windows)
    eval_windows = windows(token_stream(saved_tok, heldout_docs).tolist(), args.seq_len, args.eval_max_windows)
    uni = unigram_perplexity(train_ids, eval_windows, vocab)
    load = expert_load(saved, eval_windows[:32])
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    result = {
        "params": n_params,
        "train_tokens": int(train_ids.numel()),
        "steps": args.steps,
        "train_time_s": round(train_time, 1),
        "losses": losses,
        "final_loss": final_loss,
        "heldout_perplexity": ppl,
        "unigram_perplexity": uni,
        "heldout_tokens": sum(len(w) - 1 for w in eval_windows),
        "dir_bytes": size,
        "expert_load": load,
        "outliers": planted,
    }
    print(f"train time {train_time:.0f}s; final train loss (mean of last 50 steps) {final_loss:.4f}", flush=True)
    print(f"held-out perplexity (saved bf16 model, {result['heldout_tokens']} tokens): {ppl:.3f}", flush=True)
    print(f"unigram baseline perplexity on the same tokens: {uni:.3f}  (ratio {ppl / uni:.3f})", flush=True)
    print(f"saved {args.out} ({size / 1e6:.2f} MB); expert load per layer: {json.dumps(load)}", flush=True)
    return result


@torch.no_grad()
def expert_load(model, wins: list[list[int]]) -> list[list[float]]:
    """Fraction of routed (token, slot) pairs per expert, per layer, on `wins`."""
    loads = []
    n = model.config.num_experts
    for w in wins:
        out = model(input_ids=torch.tensor([w]), output_router_logits=True)
        for i, logits in enumerate(out.router_logits):
            top = logits.topk(model.config.num_experts_per_tok, dim=-1).indices.flatten()
            c = torch.bincount(top, minlength=n).double()
            if len(loads) <= i:
                loads.append(torch.zeros(n, dtype=torch.float64))
            loads[i] += c
    return [[round(float(x), 3) for x in (c / c.sum())] for c in loads]


if __name__ == "__main__":
    main()
