# Decide the Triton mode before anything imports triton (transformers' model classes do): without a GPU
# every kernel runs under the interpreter. Importing torch does not import triton, so asking is safe.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
