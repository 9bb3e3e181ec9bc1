"""`python -m r1jax sample`: G completions per prompt from a Hugging Face folder or a randomly initialised preset."""
import argparse
import json
import os
import sys
import time

import jax

from r1jax import hf, sampler, sharding
from r1jax.model import PRESETS, ModelConfig, create_model
from r1jax.tokenizer import load_tokenizer, r1_zero_prompt


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, for presets that come without a tokenizer; it has no stop tokens."""

    bos_id = None
    eos_id = pad_id = 0
    stop_ids: tuple[int, ...] = ()
    chat_template = None

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        out, run = [], []
        for i in ids + [-1]:
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(bytes(run).decode("utf-8", errors="replace"))
            run = []
            if i >= 256:
                out.append(f"<{i}>")
        return "".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help=f"a Hugging Face folder, or a preset with random weights: {', '.join(PRESETS)}")
    parser.add_argument("--tokenizer", help="tokenizer folder or file (default: the model folder; bytes for a preset)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    parser.add_argument("-n", "--num-samples", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-len", type=int, help="default: the longest prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--r1-zero", action="store_true", help="wrap each prompt in the R1-Zero template")
    parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor mesh shape (one may be -1)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype")
    parser.add_argument("--cache-dtype", choices=("float32", "bfloat16"),
                        help="KV cache dtype (default: the compute dtype: bfloat16 on accelerators, float32 on CPU)")
    parser.add_argument("--memory", action="store_true", help="print the memory estimate and exit (loads no weights)")


def _model_config(args) -> ModelConfig:
    if args.model in PRESETS:
        return ModelConfig.preset(args.model).replace(param_dtype=args.dtype)
    with open(os.path.join(args.model, "config.json")) as f:
        return hf.config_from_hf(json.load(f), param_dtype=args.dtype)


def _tokenizer(args):
    path = args.tokenizer or (None if args.model in PRESETS else args.model)
    return ByteTokenizer() if path is None else load_tokenizer(path)


def _prompt_ids(args, tokenizer) -> list[list[int]]:
    out = []
    for text in args.prompt:
        if args.r1_zero:
            text = r1_zero_prompt(text)
        if args.chat:
            if tokenizer.chat_template is None:
                raise SystemExit("--chat: this tokenizer has no chat template")
            out.append(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True))
        else:
            out.append(tokenizer.encode(text, add_bos=True))
    return out


def run(args) -> int:
    mcfg = _model_config(args)
    tokenizer = _tokenizer(args)
    prompts = _prompt_ids(args, tokenizer)
    longest = max(len(p) for p in prompts)
    greedy = args.greedy or args.temperature == 0
    scfg = sampler.SamplerConfig(
        max_prompt_len=args.max_prompt_len or longest,
        max_new_tokens=args.max_new_tokens,
        group_size=args.num_samples,
        temperature=1.0 if greedy else args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, greedy=greedy,
        stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id, cache_dtype=args.cache_dtype,
    )
    if longest > scfg.max_prompt_len:
        raise SystemExit(f"a prompt has {longest} tokens, more than --max-prompt-len {scfg.max_prompt_len}")
    sampler.check_fits(mcfg, scfg)  # before loading weights
    sizes = tuple(int(x) for x in args.mesh.split(","))
    mesh_cfg = sharding.MeshConfig(*sizes)
    if args.memory:  # a full mesh shape plans for a pod from any machine; -1 takes this machine's devices
        mesh_shape = mesh_cfg.shape(jax.device_count()) if -1 in sizes else sizes
        print(sampler.memory_report(mcfg, scfg, len(prompts), mesh_shape).table())
        return 0

    mesh = mesh_cfg.make()
    if args.model in PRESETS:
        print(f"note: {args.model} is a preset: its weights are RANDOM, so the text is noise "
              f"(tokenizer: {'bytes' if isinstance(tokenizer, ByteTokenizer) else args.tokenizer})", file=sys.stderr)
        model = create_model(mcfg, mesh=mesh, rules=sharding.SAMPLE_RULES, seed=args.seed)
    else:
        mcfg, model = hf.load_hf(args.model, args.dtype, mesh=mesh, rules=sharding.SAMPLE_RULES)
    model = sharding.for_sampling(model, mesh)  # per-layer weights in the compute dtype: what decoding reads

    start = time.perf_counter()
    rollout = sampler.generate(model, prompts, jax.random.key(args.seed), scfg)
    tokens = sharding.host_array(rollout.tokens_BxT)
    mask = sharding.host_array(rollout.mask_BxT)
    finished = sharding.host_array(rollout.finished_B)
    logp = sharding.host_array(rollout.logp_BxT)
    seconds = time.perf_counter() - start
    G = scfg.group_size
    for p, text in enumerate(args.prompt):
        print(f"=== prompt {p}: {text!r}")
        for g in range(G):
            row = p * G + g
            ids = tokens[row][mask[row]]
            why = "stop" if finished[row] else "length"
            print(f"--- sample {g + 1}/{G}: {len(ids)} tokens, ended by {why}, "
                  f"logp {float(logp[row][mask[row]].sum()):.2f}")
            print(tokenizer.decode(ids, skip_special_tokens=True))
    print(f"({int(mask.sum())} tokens in {seconds:.2f}s including compilation)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1jax sample", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
