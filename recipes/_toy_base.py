"""The embedded defaults' base model: a small model pretrained on a built-in task's corpus, with its
own SentencePiece tokenizer, cached across runs by everything it depends on."""
import dataclasses
import hashlib
import os
import shutil

import jax

from r1jax import sft
from r1jax.model import ModelConfig, create_model
from r1jax.run import Context, Policy, load_policy, save_policy
from r1jax.tokenizer import Tokenizer, train_sentencepiece


def cache_key(*what) -> str:
    """A short hash of the settings (dataclasses and plain values) the base model depends on; a field
    named cache_dir is left out (where the cache lives changes nothing in it)."""
    def strip(x):
        return dataclasses.replace(x, cache_dir="") if dataclasses.is_dataclass(x) and hasattr(x, "cache_dir") else x
    return hashlib.sha256(repr(tuple(strip(x) for x in what)).encode()).hexdigest()[:12]


def pretrain(ctx: Context, *, name: str, cache: str, corpus: list[tuple[str, str]], preset: str, vocab_size: int,
             cfg: sft.SFTConfig, seed: int, chat_template: str | None = None,
             tokenizer: Tokenizer | None = None) -> Policy:
    """Train a tokenizer on the corpus's first 5000 texts (unless `tokenizer` is given: a distillation student
    shares its teacher's), then pretrain `preset` on (prompt, completion) pairs; the result is kept in `cache`
    (a folder), and reused when it exists."""
    if os.path.exists(os.path.join(cache, "config.json")):
        print(f"[r1jax] {name}: reusing the cached base model in {cache}")
        return load_policy(cache, ctx)
    if tokenizer is None:
        tokenizer = train_sentencepiece([p + c for p, c in corpus[:5000]], None, vocab_size, max_piece_length=128,
                                        split_by_whitespace=False, split_by_unicode_script=False,
                                        chat_template=chat_template)
    mcfg = ModelConfig.preset(preset).replace(vocab_size=vocab_size, **ctx.model_overrides)
    policy = Policy(mcfg, create_model(mcfg, mesh=ctx.mesh, seed=ctx.seed), tokenizer)
    policy = sft.sft_stage(ctx, policy, corpus, cfg, name=name, seed=seed)
    tmp = cache + ".tmp"
    save_policy(policy, tmp)
    if jax.process_index() == 0:
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    return policy
