"""Bundled data (stories260K and a TinyStories excerpt), tokenization into windows, and perplexity.

``flextron/data/`` ships Karpathy's stories260K (MIT; see ``data/stories260K/SOURCE.md``) in Hugging Face format
and about 100 KB of TinyStories text (CDLA-Sharing-1.0; see ``data/LICENSE-tinystories.md``), so the demo runs
offline on a fresh install.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DATA_DIR = Path(__file__).resolve().parent / "data"
STORIES260K_DIR = DATA_DIR / "stories260K"
TINYSTORIES_EXCERPT = DATA_DIR / "tinystories_excerpt.txt"
STORY_SEPARATOR = "<|endoftext|>"


def load_stories260k(dtype: torch.dtype = torch.float32):
    """The bundled stories260K as ``(LlamaForCausalLM, tokenizer)``, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES260K_DIR, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(STORIES260K_DIR)


def read_stories(path: str | Path = TINYSTORIES_EXCERPT, *, drop_last: bool = False) -> list[str]:
    """The stories of a TinyStories text file (split on ``<|endoftext|>``).

    ``drop_last``: drop the text after the last separator (a file cut mid-story, like the shared 2 MiB sample).
    """
    parts = Path(path).read_text(encoding="utf-8").split(STORY_SEPARATOR)
    if drop_last:
        parts = parts[:-1]
    return [p.strip() for p in parts if p.strip()]


def token_windows(tokenizer, stories: list[str], seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """``[N, seq_len]`` token ids: each story as ``<s>`` + its tokens, concatenated and cut into full windows.

    Fixed windows need no padding, so every position of a batch is a real token (ranking and perplexity both
    count every position).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids: list[int] = []
    bos = tokenizer.bos_token_id
    for s in stories:
        ids += ([bos] if bos is not None else []) + tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]
        if max_windows is not None and len(ids) >= max_windows * seq_len:
            break
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"stories must hold at least seq_len={seq_len} tokens, got {len(ids)}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(windows.split(batch_size))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, *, progress=None) -> float:
    """``exp`` of the mean next-token cross-entropy over every predicted position of ``windows``.

    ``progress``: an optional tqdm bar advanced by one per batch.
    """
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for b in windows.split(batch_size):
        b = b.to(device)
        logits = model(input_ids=b).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += b[:, 1:].numel()
        if progress is not None:
            progress.update(1)
    return math.exp(total / count)


def progress_bar(total: int, desc: str, disable: bool = False):
    return tqdm(total=total, desc=desc, disable=disable, leave=False)
