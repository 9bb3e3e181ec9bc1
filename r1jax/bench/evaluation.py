"""A real-model-shaped evaluation end to end: `python -m r1jax eval` of a random SmolLM2-135M-shaped Llama (its
49,152-token vocabulary, a byte-level BPE trained on GSM8K's questions) on GSM8K's test file at R1's settings
(temperature 0.6, top-p 0.95), as a new user runs it; wall time and the process's peak resident memory.

    python -m r1jax.bench.evaluation --prompts 256 --samples 2 --new-tokens 192 [--slots 64] [--json out.json]

The random model never writes its stop token, so every completion runs to --new-tokens: the lockstep sampler's
worst case and continuous batching's too (no row frees its slot early).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "gsm8k")


def make_folder(folder: str, gsm8k: str, preset: str = "smollm2-135m") -> None:
    """Random weights of the preset's shape and a tokenizer of exactly its vocabulary: a byte-level BPE trained
    on GSM8K's questions, filled up with unused tokens."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from r1jax.bench.sampler import hf_twin
    from r1jax.model import ModelConfig

    mcfg = ModelConfig.preset(preset)
    with open(os.path.join(gsm8k, "train.jsonl")) as f:
        texts = [json.loads(line)["question"] for line in f]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<unk>", "<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_tokens([f"<unused_{i}>" for i in range(mcfg.vocab_size - bpe.get_vocab_size())])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>", unk_token="<unk>")
    assert len(fast) == mcfg.vocab_size, len(fast)
    fast.save_pretrained(folder)
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    hf_twin(mcfg, "float32", folder, qwen2=False, eos_token_id=eos, pad_token_id=eos, bos_token_id=None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1jax.bench.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--slots", type=int, default=0, help="continuous batching's decode slots (0: lockstep)")
    parser.add_argument("--gsm8k", default=os.path.normpath(GSM8K))
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "smollm2-135m-random")
        make_folder(folder, args.gsm8k)
        cmd = [sys.executable, "-m", "r1jax", "eval", "--recipe", "r1_zero", "--model", folder,
               "--out", os.path.join(tmp, "results.json"), f"data.eval={os.path.join(args.gsm8k, 'test.jsonl')}",
               f"run_dir={os.path.join(tmp, 'run')}", "rl.max_prompt_len=320", f"eval.num_prompts={args.prompts}",
               f"eval.samples={args.samples}", f"eval.max_new_tokens={args.new_tokens}", f"eval.slots={args.slots}"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        with open(os.path.join(tmp, "results.json")) as f:
            results = json.load(f)
    tokens = args.prompts * args.samples * results["eval_completion_len_mean"]
    print(f"evaluation of a random smollm2-135m-shaped Llama on GSM8K: {args.prompts} prompts x {args.samples} "
          f"samples x up to {args.new_tokens} new tokens, top-p 0.95, "
          f"{'continuous batching over ' + str(args.slots) + ' slots' if args.slots else 'lockstep batches'}")
    print(f"wall time {seconds:.0f} s ({seconds / 60:.1f} min), {tokens / seconds:.1f} generated tokens/s, "
          f"peak resident memory {peak / 2**30:.2f} GiB (the eval process)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bench="evaluation", prompts=args.prompts, samples=args.samples, new_tokens=args.new_tokens,
                           slots=args.slots, seconds=seconds, tokens_per_s=tokens / seconds, peak_rss_bytes=peak,
                           completion_len_mean=results["eval_completion_len_mean"]), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
