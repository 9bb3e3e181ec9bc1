"""Reward model (R1's all-scenario RL stage): the policy's Transformer with a scalar head, its Hugging
Face `*ForSequenceClassification` folders, the Bradley-Terry loss and train step, and a batched scorer.

Shapes: B rows, S sequence length, D width, L layers.
"""
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.typing import DTypeLike

from r1jax import hf, sharding
from r1jax.model import ModelConfig, Transformer, positions_from_mask
from r1jax.rewards.model_based import make_model_reward
from r1jax.rewards.template import R1_TAGS, Tags
from r1jax.safetensors_io import SafetensorsFolder, write_safetensors
from r1jax.sharding import ActivationSharding
from r1jax.tokenizer import load_tokenizer
from r1jax.train import TrainState, apply_if_finite

SEQ_CLS = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
           "qwen3": "Qwen3ForSequenceClassification"}


class RewardModel(nnx.Module):
    """`Transformer` backbone + `score` (D -> 1, no bias, as transformers' `score` layer with num_labels=1).

    A sequence's reward is the head on the final-normed hidden state of its last real token. The
    backbone is built with tied embeddings whatever `cfg` says: tying only decides whether an LM head
    exists, and a reward model has none (its HF folders hold no `lm_head.weight`).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, act_sharding: ActivationSharding | None = None,
                 pad_token_id: int | None = None):
        self.cfg = cfg
        self.pad_token_id = pad_token_id  # kept only to write config.json back
        self.backbone = Transformer(cfg.replace(tie_embeddings=True), rngs=rngs, act_sharding=act_sharding)
        D = cfg.d_model
        init = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (D, 1), jnp.dtype(cfg.param_dtype))
        self.score = nnx.Param(init / math.sqrt(D), axes=("embed", None))

    def __call__(self, tokens_BxS, mask_BxS, positions_BxS=None) -> jax.Array:
        """reward_B (fp32). The scored token is the last position whose mask is true, so left and right
        padding both work; transformers instead takes the last token that is not `pad_token_id`."""
        if positions_BxS is None:
            positions_BxS = positions_from_mask(mask_BxS)
        h_BxSxD, _ = self.backbone.hidden(tokens_BxS, positions_BxS, mask_BxS)
        S = tokens_BxS.shape[1]
        last_B = jnp.max(jnp.where(mask_BxS, jnp.arange(S), 0), axis=1)
        h_BxD = jnp.take_along_axis(h_BxSxD, last_B[:, None, None], axis=1)[:, 0]
        w_Dx1 = self.score.get_value().astype(h_BxD.dtype)
        reward_B = jnp.einsum("BD,DO->BO", h_BxD, w_Dx1, preferred_element_type=jnp.float32)[:, 0]
        return self.backbone._constrain(reward_B, ("batch",))


def create_reward_model(cfg: ModelConfig, *, mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules = sharding.TRAIN_RULES, seed: int = 0,
                        pad_token_id: int | None = None) -> RewardModel:
    """A randomly initialised reward model, created directly on its shards."""
    mesh = sharding.MeshConfig().make() if mesh is None else mesh
    act = ActivationSharding(mesh, rules)
    return sharding.init_sharded(
        lambda: RewardModel(cfg, rngs=nnx.Rngs(seed), act_sharding=act, pad_token_id=pad_token_id), mesh, rules)


# --- Hugging Face folders ---------------------------------------------------------------------------

def _tensor_table(cfg: ModelConfig):
    """state path -> (HF name, HF -> r1jax, r1jax -> HF, stacked over layers)."""
    tied = cfg.replace(tie_embeddings=True)
    layer_map, top_map = hf._layer_map(tied), hf._top_map(tied)

    def lookup(path: tuple[str, ...]):
        if path == ("score",):  # torch Linear (1, D) <-> (D, 1)
            return "score.weight", np.transpose, np.transpose, False
        if path[:2] == ("backbone", "layers"):
            return (*layer_map[path[2]], True)
        return (*top_map[path[1]], False)

    return lookup


def _read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    arch = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in arch):
        raise ValueError(f"{path}: architectures={arch} is not a *ForSequenceClassification reward model; "
                         f"r1jax reads {sorted(SEQ_CLS.values())}")
    num_labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    if num_labels != 1:  # transformers' default without id2label is 2
        raise ValueError(f"{path}: num_labels={num_labels}; a reward model has one output (num_labels=1)")
    return config


def load_reward_model(path: str, dtype: DTypeLike = "float32", *, mesh: jax.sharding.Mesh | None = None,
                      rules: sharding.Rules = sharding.TRAIN_RULES) -> tuple[ModelConfig, RewardModel]:
    """Read a Hugging Face `*ForSequenceClassification` folder (num_labels=1) into a sharded RewardModel;
    like `hf.load_hf`, each device reads only its own slices of the memory-mapped tensors."""
    dtype = hf._dtype_name(dtype)
    config = _read_config(path)
    cfg = hf.config_from_hf(config, param_dtype=dtype)
    tensors = SafetensorsFolder(path)
    lookup = _tensor_table(cfg)
    mesh = sharding.MeshConfig().make() if mesh is None else mesh
    act = ActivationSharding(mesh, rules)
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: RewardModel(cfg, rngs=nnx.Rngs(0), act_sharding=act, pad_token_id=config.get("pad_token_id"))))
    paths = [tuple(k.key for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(
        abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]]
    wanted = [name.format(i) for p in paths for name, _, _, stacked in [lookup(p)]
              for i in (range(cfg.n_layers) if stacked else [0])]
    missing = [name for name in wanted if name not in tensors]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"{path}: missing tensors for {cfg.name}: {shown}")
    if tensors["score.weight"].shape != (1, cfg.d_model):
        raise ValueError(f"{path}: score.weight has shape {tensors['score.weight'].shape}, want (1, {cfg.d_model})")
    np_dtype = np.dtype(jnp.dtype(dtype))

    def build(key_path, var, target):
        hf_name, to_r1, _, stacked = lookup(tuple(k.key for k in key_path))

        def shard(index):
            if not stacked:
                return np.asarray(to_r1(tensors[hf_name]))[index].astype(np_dtype)
            rows = range(cfg.n_layers)[index[0]]
            return np.stack([np.asarray(to_r1(tensors[hf_name.format(i)]))[index[1:]] for i in rows]).astype(np_dtype)

        return var.replace(value=jax.make_array_from_callback(var.get_value().shape, target, shard))

    shardings = sharding.state_shardings(abstract, mesh, rules)
    state = jax.tree_util.tree_map_with_path(build, abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return cfg, nnx.merge(graphdef, state)


def save_reward_model(cfg: ModelConfig, rm: RewardModel, path: str, tokenizer=None, *,
                      dtype: DTypeLike | None = None) -> None:
    """Write a folder that transformers' AutoModelForSequenceClassification loads: config.json (num_labels=1,
    pad_token_id from the tokenizer, else the one read at load), one safetensors file, the tokenizer's files.
    Every process joins each tensor's gather; only process 0 writes."""
    dtype = hf._dtype_name(dtype or cfg.param_dtype)
    np_dtype = np.dtype(jnp.dtype(dtype))
    lookup = _tensor_table(cfg)
    specs, fetchers = [], {}
    for key_path, var in jax.tree_util.tree_flatten_with_path(
            nnx.state(rm), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        hf_name, _, to_hf, stacked = lookup(tuple(k.key for k in key_path))
        shape = var.get_value().shape[1:] if stacked else var.get_value().shape
        hf_shape = np.asarray(to_hf(np.empty(shape, np.uint8))).shape
        for i in range(cfg.n_layers) if stacked else [None]:
            name = hf_name.format(i) if stacked else hf_name
            specs.append((name, hf_shape, np_dtype))
            fetchers[name] = lambda v=var.get_value(), i=i, to_hf=to_hf: to_hf(
                sharding.host_array(v if i is None else v[i]))
    if jax.process_index() != 0:
        for name, _, _ in specs:  # still join the collective gathers, in the same order
            fetchers[name]()
        return
    os.makedirs(path, exist_ok=True)
    # One file: transformers reads a single large safetensors file as readily as shards.
    write_safetensors(os.path.join(path, "model.safetensors"), specs, lambda n: fetchers[n](), {"format": "pt"})
    config = hf.config_to_hf(cfg, torch_dtype=dtype)
    config.update(architectures=[SEQ_CLS[config["model_type"]]], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0},
                  pad_token_id=tokenizer.pad_id if tokenizer is not None else rm.pad_token_id)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(path)


# --- Bradley-Terry training ---------------------------------------------------------------------------

class BTAux(NamedTuple):
    accuracy: jax.Array  # share of pairs with chosen > rejected (ties count as wrong)
    margin: jax.Array  # mean of chosen - rejected


def bradley_terry_loss(chosen_B, rejected_B, *, margin_B=None) -> tuple[jax.Array, BTAux]:
    """mean(-log sigmoid(chosen - rejected - margin)); `margin_B` (Llama 2's preference-strength margin)
    asks the chosen reward to win by at least that much."""
    diff_B = chosen_B.astype(jnp.float32) - rejected_B.astype(jnp.float32)
    logits_B = diff_B if margin_B is None else diff_B - margin_B
    loss = jnp.mean(-jax.nn.log_sigmoid(logits_B))
    return loss, BTAux(accuracy=jnp.mean(diff_B > 0), margin=jnp.mean(diff_B))


@struct.dataclass
class PreferenceBatch:
    """Pairs of (prompt + response) token rows; masks are False on padding (left or right)."""

    chosen_BxS: jax.Array
    chosen_mask_BxS: jax.Array
    rejected_BxS: jax.Array
    rejected_mask_BxS: jax.Array
    margin_B: jax.Array | None = None


@functools.partial(jax.jit, donate_argnames="state")
def rm_step(state: TrainState, batch: PreferenceBatch):
    """One optimizer step of the Bradley-Terry loss; chosen and rejected share one forward when their
    shapes agree."""

    def loss_fn(params):
        rm = nnx.merge(state.graphdef, params)
        B = batch.chosen_BxS.shape[0]
        if batch.chosen_BxS.shape == batch.rejected_BxS.shape:
            both = rm(jnp.concatenate([batch.chosen_BxS, batch.rejected_BxS]),
                      jnp.concatenate([batch.chosen_mask_BxS, batch.rejected_mask_BxS]))
            chosen_B, rejected_B = both[:B], both[B:]
        else:
            chosen_B = rm(batch.chosen_BxS, batch.chosen_mask_BxS)
            rejected_B = rm(batch.rejected_BxS, batch.rejected_mask_BxS)
        loss, aux = bradley_terry_loss(chosen_B, rejected_B, margin_B=batch.margin_B)
        return loss, (aux, jnp.mean(chosen_B), jnp.mean(rejected_B))

    (loss, (aux, chosen, rejected)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    state, finite = apply_if_finite(state, grads, loss, grad_norm)
    return state, {"loss": loss, "accuracy": aux.accuracy, "margin": aux.margin, "chosen_reward": chosen,
                   "rejected_reward": rejected, "grad_norm": grad_norm,
                   "nonfinite_updates": (~finite).astype(jnp.int32)}


# --- Scoring text -----------------------------------------------------------------------------------

def encode_for_scoring(tokenizer, texts: Sequence[str], max_len: int, *, add_bos: bool = True) -> list[list[int]]:
    """Token rows as a reward model reads them, in training (`reward_model_stage`) and scoring (`Scorer`)
    alike: BOS (when `add_bos` and the tokenizer has one, as transformers' tokenizer call adds it), then the
    text's LAST tokens, max_len in all, since the final answer is what is judged; an empty row is one pad."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    keep = max_len - len(bos)
    rows = [bos + ids[max(len(ids) - keep, 0):] for ids in tokenizer.encode_batch(list(texts))]
    return [row or [tokenizer.pad_id] for row in rows]


def bucket_len(length: int, *, min_len: int, max_len: int) -> int:
    """The padded width of a batch whose longest row has `length` tokens: the next power of two, within
    [min_len, max_len], so a run compiles a handful of shapes."""
    return min(max_len, max(min_len, 1 << max(length - 1, 0).bit_length()))


@functools.partial(jax.jit, static_argnames="graphdef")
def _score_rows(graphdef, state, tokens_BxS, mask_BxS):
    return nnx.merge(graphdef, state)(tokens_BxS, mask_BxS)


class Scorer:
    """`scorer(texts) -> float32 scores`, batched and sharded over `mesh`.

    Each text is encoded (with BOS when `add_bos` and the tokenizer has one, as transformers' tokenizer
    call does), and one longer than `max_len` keeps its END: the final answer is what is judged. Rows
    are sorted by length, cut into batches of `batch_size` (the last one filled with dummy rows) and
    left-padded to a power-of-two length (at least `min_len`, at most `max_len`), so a run compiles one
    shape per power of two in [min_len, max_len], plus max_len. An empty text is scored as one pad token. Every
    process must pass the same texts (rows are placed with `sharding.put_rows`).
    The model is resharded onto (`mesh`, `rules`): a copy when it lives elsewhere.
    """

    def __init__(self, rm: RewardModel, tokenizer, mesh: jax.sharding.Mesh, batch_size: int, max_len: int, *,
                 rules: sharding.Rules = sharding.SAMPLE_RULES, add_bos: bool = True, min_len: int = 16):
        if batch_size < 1 or max_len < 2:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and max_len={max_len} >= 2")
        model = sharding.reshard(rm, mesh, rules)
        model.backbone.act_sharding = ActivationSharding(mesh, rules)
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer, self.mesh, self.rules = tokenizer, mesh, rules
        self.batch_size, self.max_len, self.min_len = batch_size, max_len, min(min_len, max_len)
        self.add_bos = add_bos

    def bucket(self, length: int) -> int:
        return bucket_len(length, min_len=self.min_len, max_len=self.max_len)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return encode_for_scoring(self.tokenizer, texts, self.max_len, add_bos=self.add_bos)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        rows = self.encode(texts)
        order = np.argsort([len(r) for r in rows], kind="stable")
        put = functools.partial(sharding.put_rows, mesh=self.mesh, rules=self.rules)
        pending = []
        for start in range(0, len(rows), self.batch_size):
            idx = order[start:start + self.batch_size]
            S = self.bucket(max(len(rows[i]) for i in idx))
            tokens = np.full((self.batch_size, S), self.tokenizer.pad_id, np.int32)
            mask = np.zeros((self.batch_size, S), bool)
            mask[len(idx):, -1] = True  # dummy rows: one real token each, scores dropped
            for j, i in enumerate(idx):
                tokens[j, S - len(rows[i]):], mask[j, S - len(rows[i]):] = rows[i], True
            pending.append((idx, _score_rows(self.graphdef, self.state, put(tokens), put(mask))))
        scores = np.zeros(len(rows), np.float32)
        for idx, out in pending:  # all batches dispatched before the first is read
            scores[idx] = sharding.host_array(out)[:len(idx)]
        return scores


def render_plain(prompt: str, response: str) -> str:
    """The default reward-model input: "User: {prompt}\\n\\nAssistant: {response}". It must match how the
    reward model was trained: pass e.g. a chat-template renderer for a chat-tuned one."""
    return f"User: {prompt}\n\nAssistant: {response}"


def as_reward(scorer: Callable[[list[str]], np.ndarray], view: Literal["answer", "full"] = "answer", *,
              render: Callable[[str, str], str] = render_plain, tags: Tags = R1_TAGS,
              transform: Callable[[np.ndarray], np.ndarray] | None = None):
    """The reward contract `fn(completions, examples) -> scores` over `scorer`, through
    `rewards.make_model_reward`: the input is `render(example["prompt"], shown)`, where `shown` is the final
    answer (view="answer": the <answer> block, else the text after </think>; R1's helpfulness reward) or
    the whole completion, reasoning included (view="full": harmlessness)."""
    return make_model_reward(lambda prompts, texts: scorer([render(p, t) for p, t in zip(prompts, texts)]),
                             view=view, tags=tags, transform=transform)


def reward_inputs(prompts: Sequence[str], responses: Sequence[str], view: Literal["answer", "full"] = "answer", *,
                  render: Callable[[str, str], str] = render_plain, tags: Tags = R1_TAGS) -> list[str]:
    """The texts `as_reward(scorer, view, render=render, tags=tags)` shows its scorer for these responses.
    Reward-model training renders its inputs through this very call, so what a model is trained on and
    what it is later shown cannot drift apart."""
    shown: list[str] = []

    def record(texts):
        shown.extend(texts)
        return np.zeros(len(texts), np.float32)

    as_reward(record, view, render=render, tags=tags)(list(responses), [{"prompt": p} for p in prompts])
    return shown


def load_scorer(path: str, mesh: jax.sharding.Mesh, *, batch_size: int, max_len: int,
                dtype: DTypeLike = "float32") -> Scorer:
    """A Scorer over a reward-model folder (weights + tokenizer, as `reward_model_stage` writes), its
    weights read straight onto the sampling rules' shards."""
    _, rm = load_reward_model(path, dtype, mesh=mesh, rules=sharding.SAMPLE_RULES)
    return Scorer(rm, load_tokenizer(path), mesh, batch_size, max_len)
