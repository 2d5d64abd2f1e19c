"""``lm``: a small causal Transformer language model on a byte-level text corpus.

Mirrors the paper's Transformer (WMT, BERT) experiments at CPU scale.

The corpus is the Python source (code, comments and docstrings) of a fixed list of
modules of the installed ``torch`` package. It is the one sizeable English-and-code text
that is present, offline, on every machine that can run this program at all, and with
torch pinned (the README installs ``torch==2.13.0``) it is byte-identical across
machines. Its name, size and SHA-256 go into ``results.json``, together with whether the
hash matches the one recorded here for torch 2.13.0, so a reader can tell whether two
results were trained on the same text. Tokens are bytes (vocabulary 256): no tokenizer to
ship or version. The last 10% of every file is held out.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import Workload, seeded_generator

CORPUS_MODULES = (
    "torch.nn.modules.module", "torch.nn.functional", "torch._tensor",
    "torch.optim.optimizer", "torch.optim.adam", "torch.optim.lr_scheduler",
    "torch.nn.modules.conv", "torch.nn.modules.activation", "torch.nn.modules.loss",
    "torch.nn.modules.transformer", "torch.functional", "torch.serialization",
    "torch.autograd.function", "torch.utils.data.dataloader",
)
# SHA-256 of the concatenated corpus files under torch 2.13.0 (the README's pin).
REFERENCE_SHA256 = {"2.13.0": "8a0fed334ec5bb69db5672a4dfea5c5c6dc4e49f48ce889de60be63f83fc9b81"}
HELD_OUT_FRACTION = 0.1
VOCAB = 256
CONTEXT = 64
WIDTH = 128
DEPTH = 2
HEADS = 4
BATCH = 32
EVAL_WINDOWS = 256


@lru_cache(maxsize=1)
def corpus() -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(train bytes, held-out bytes, info)``: the last ``HELD_OUT_FRACTION`` of every
    module's source is held out."""
    train, held_out, digest, size = [], [], hashlib.sha256(), 0
    for name in CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"lm corpus: module {name} of torch not found")
        with open(spec.origin, "rb") as handle:
            data = handle.read()
        digest.update(data)
        size += len(data)
        cut = int(len(data) * (1 - HELD_OUT_FRACTION))
        train.append(data[:cut])
        held_out.append(data[cut:])
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()
    sha = digest.hexdigest()
    info = {"corpus": "source of torch modules " + ", ".join(CORPUS_MODULES),
            "corpus_bytes": size, "corpus_sha256": sha, "torch_version": torch.__version__,
            "corpus_matches_reference": sha == REFERENCE_SHA256.get(
                torch.__version__.split("+")[0])}
    return as_tensor(train), as_tensor(held_out), info


class Block(torch.nn.Module):
    """Pre-norm Transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CausalTransformer(torch.nn.Module):
    """Token and learned position embeddings, ``depth`` blocks, a final norm and an
    untied output projection."""

    def __init__(self, vocab: int, context: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.token = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Embedding(context, width)
        self.blocks = torch.nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token(tokens) + self.position.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def windows(text: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Rows ``text[s : s + CONTEXT + 1]`` for every start ``s``."""
    return text[starts.unsqueeze(1) + torch.arange(CONTEXT + 1)]


def next_byte_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per byte) of predicting each byte from those before it."""
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), rows[:, 1:].reshape(-1))


def build(seed: int) -> Workload:
    """The ``lm`` workload; the seed sets the initialisation and the batch order."""
    train, held_out, info = corpus()
    torch.manual_seed(seed)
    model = CausalTransformer(VOCAB, CONTEXT, WIDTH, DEPTH, HEADS)
    # The held-out windows are fixed (not seeded) so that every run is scored on the same text.
    eval_rows = windows(held_out, torch.randint(len(held_out) - CONTEXT - 1, (EVAL_WINDOWS,),
                                                generator=seeded_generator(0)))

    def train_batch(step: int) -> torch.Tensor:
        starts = torch.randint(len(train) - CONTEXT - 1, (BATCH,),
                               generator=seeded_generator(seed, step))
        return windows(train, starts)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        loss = next_byte_loss(model, eval_rows).item()
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    return Workload(
        name="lm",
        description=f"causal Transformer ({DEPTH} blocks, width {WIDTH}, context {CONTEXT}) "
                    f"on the bytes of torch's source, batch {BATCH}x{CONTEXT} tokens",
        model=model, train_batch=train_batch, loss=next_byte_loss, evaluate=evaluate,
        steps=500, quick_steps=150, eval_every=25,
        lr_centers={"shampoo": 3e-3, "adamw": 3e-3, "adagrad": 1e-2, "sgd": 3e-1},
        info={**info, "train_bytes": len(train), "held_out_bytes": len(held_out),
              "eval_tokens": EVAL_WINDOWS * CONTEXT, "batch": BATCH, "context": CONTEXT,
              "parameters": sum(p.numel() for p in model.parameters())})
