"""What the pipeline needs of a tokenizer, and how `prepare` loads one named by its config.

data_pipeline sits below tokenizer/ in the package layers (.importlinter), so it types the tokenizer as a Protocol
and gets the concrete one from `tokenizer.loader`, a `module:callable` string (by default the project's
`tokenizer.tokenizer:Tokenizer.from_dir`). Any object with these four members works, e.g. a small adapter around a
Hugging Face tokenizer.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

from data_pipeline.config import TokenizerRef


@runtime_checkable
class TextTokenizer(Protocol):
    """A tokenizer as `prepare` uses it; multi-worker runs pickle it into each worker process."""

    @property
    def vocab_size(self) -> int:
        """Number of ids (chooses the shards' dtype)."""
        ...

    @property
    def eos_id(self) -> int:
        """Appended after every document."""
        ...

    @property
    def sha256(self) -> str:
        """Identity of the tokenizer: recorded in manifest.json, checked by training, part of work fingerprints."""
        ...

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """Ids of each text without bos/eos; num_threads 0 = all cores."""
        ...


def load_tokenizer(ref: TokenizerRef) -> TextTokenizer:
    """Call `ref.loader` on `ref.path`; a clear ValueError or ImportError when either is wrong."""
    if not ref.path:
        raise ValueError("set tokenizer.path=DIR: a tokenizer trained by `python -m tokenizer.train`")
    module_name, _, qualname = ref.loader.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"tokenizer.loader={ref.loader!r}: write module:callable, e.g. mypkg.tok:load")
    loader = importlib.import_module(module_name)
    for name in qualname.split("."):
        if not hasattr(loader, name):
            raise ValueError(f"tokenizer.loader={ref.loader!r}: {module_name} has no {qualname}")
        loader = getattr(loader, name)
    tok = loader(ref.path)
    if not isinstance(tok, TextTokenizer):
        raise ValueError(
            f"tokenizer.loader={ref.loader!r} returned {type(tok).__name__}, which lacks one of vocab_size, eos_id, "
            "sha256, encode_batch (data_pipeline.text_tokenizer.TextTokenizer)"
        )
    return tok
