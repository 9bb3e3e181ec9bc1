"""Decoder-only transformer for the Llama / Qwen2 / Qwen3 families, in Flax NNX.

Shapes: B rows, T query length, S key/cache length, D width, F MLP hidden, V vocab,
N query heads, K kv heads, R = N/K, H head dim, L layers.

Layers are stored stacked (a leading L axis on every block weight) and run with one
`lax.scan` (compile time flat in depth) or unrolled; decoding reads a per-layer view. Parameters carry logical
axis names in their `axes` metadata; r1jax.sharding maps them to the mesh. The configurations and presets live in
r1jax.model_config (imported here too).
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from kernels.attention import attention, cached_attention
from kernels.decode_attention import DecodeImpl, ragged_decode_attention
from kernels.mlp import gated_mlp, no_constraint
from r1jax import sharding
from r1jax.model_config import PRESETS, ModelConfig, RopeScaling  # noqa: F401  (r1jax.model's public names)
from r1jax.sharding import ActivationSharding


@struct.dataclass
class KVCache:
    """Keys/values for every layer. Slots [0, index) are written; `mask_BxS` marks
    which written slots hold real tokens (left padding does not). Heads first, and keys with their slots last
    (B, K, H, S), values (B, K, S, H): a decode step's attention is then two plain matmuls per (row, kv head) over
    contiguous blocks (`kernels.attention.cached_attention`), with no layout change of the cache.

    Each layer's keys and values are a buffer of their own (a tuple of L arrays), so a decode step writes and
    reads a layer's cache in place: a slice of one stacked (L, ...) array is a copy on XLA's CPU backend (and a
    layer's worth of cache traffic on any backend) at every step."""

    k_LxBxKxHxS: tuple[jax.Array, ...]
    v_LxBxKxSxH: tuple[jax.Array, ...]
    mask_BxS: jax.Array
    index: jax.Array  # int32 scalar: next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
        k, v = _empty_kv(cfg, batch, length, dtype)
        return cls(k, v, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))

    @staticmethod
    def bytes_per_row(cfg: ModelConfig, length: int, dtype=None) -> int:
        """K and V for all layers: 2 * L * S * K * H * bytes(dtype)."""
        itemsize = jnp.dtype(cfg.compute_dtype if dtype is None else dtype).itemsize
        return 2 * cfg.n_layers * length * cfg.n_kv_heads * cfg.head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in (*self.k_LxBxKxHxS, *self.v_LxBxKxSxH))


@struct.dataclass
class SlotCache:
    """Keys/values of B decode slots for continuous batching (r1jax.engine): each row is its own sequence,
    written from slot 0 without padding, so row b's tokens fill slots [0, lengths_B[b]) and a token's
    position is its slot. Rows start, grow and are replaced independently of one another. Per-layer buffers
    laid out as in KVCache."""

    k_LxBxKxHxS: tuple[jax.Array, ...]
    v_LxBxKxSxH: tuple[jax.Array, ...]
    lengths_B: jax.Array  # int32: filled slots per row

    @classmethod
    def init(cls, cfg: ModelConfig, rows: int, length: int, dtype=None) -> "SlotCache":
        k, v = _empty_kv(cfg, rows, length, dtype)
        return cls(k, v, jnp.zeros((rows,), jnp.int32))


def _empty_kv(cfg: ModelConfig, rows: int, length: int, dtype=None):
    dtype = cfg.compute_dtype if dtype is None else dtype
    K, H, L = cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    return (tuple(jnp.zeros((rows, K, H, length), dtype) for _ in range(L)),
            tuple(jnp.zeros((rows, K, length, H), dtype) for _ in range(L)))


# A layer's keys or values as the model's activations lay them out: rows over the batch axes, kv heads over tensor.
CACHE_AXES = ("batch", "kv_heads", None, None)


def rms_norm(x, scale, eps: float):
    # In fp32 like the HF reference, then back to the compute dtype before scaling.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32.astype(x.dtype) * scale.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """inv_freq_H/2, with Llama 3's smooth low/high frequency scaling when configured."""
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    mid = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_mid, mid, scaled)


def apply_rope(x_BxTxNxH, cos_BxTxH, sin_BxTxH):
    """HF "rotate half" convention: the two halves of each head form the pairs."""
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x_BxTxNxH.astype(jnp.float32) * cos_BxTxH[:, :, None] + rotated.astype(jnp.float32) * sin_BxTxH[:, :, None]
    return out.astype(x_BxTxNxH.dtype)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, act_sharding: ActivationSharding | None = None):
        self.cfg = cfg
        self.act_sharding = act_sharding
        L, D, F, V = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)

        def dense(shape, axes, fan_in):
            value = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, pd) / math.sqrt(fan_in)
            return nnx.Param(value, axes=axes)

        def const(shape, axes, fill):
            return nnx.Param(jnp.full(shape, fill, pd), axes=axes)

        self.embed = nnx.Param(jax.random.normal(rngs.params(), (V, D), pd) * 0.02, axes=("vocab", "embed"))
        layers = {
            "attn_norm": const((L, D), ("layers", None), 1.0),
            "wq": dense((L, D, N, H), ("layers", "embed", "heads", None), D),
            "wk": dense((L, D, K, H), ("layers", "embed", "kv_heads", None), D),
            "wv": dense((L, D, K, H), ("layers", "embed", "kv_heads", None), D),
            "wo": dense((L, N, H, D), ("layers", "heads", None, "embed"), N * H),
            "mlp_norm": const((L, D), ("layers", None), 1.0),
            "w_gate": dense((L, D, F), ("layers", "embed", "mlp"), D),
            "w_up": dense((L, D, F), ("layers", "embed", "mlp"), D),
            "w_down": dense((L, F, D), ("layers", "mlp", "embed"), F),
        }
        if cfg.qkv_bias:
            layers["bq"] = const((L, N, H), ("layers", "heads", None), 0.0)
            layers["bk"] = const((L, K, H), ("layers", "kv_heads", None), 0.0)
            layers["bv"] = const((L, K, H), ("layers", "kv_heads", None), 0.0)
        if cfg.qk_norm:
            layers["q_norm"] = const((L, H), ("layers", None), 1.0)
            layers["k_norm"] = const((L, H), ("layers", None), 1.0)
        self.layers = nnx.Dict(layers)
        self.final_norm = const((D,), (None,), 1.0)
        if not cfg.tie_embeddings:
            self.lm_head = dense((D, V), ("embed", "vocab"), D)

    def _constrain(self, x, axes):
        return x if self.act_sharding is None else self.act_sharding.constrain(x, axes)

    def __call__(self, tokens_BxT, positions_BxT=None, mask_BxT=None, cache: KVCache | None = None):
        """Logits (fp32) for every position, and the updated cache (None without one).

        Without `positions_BxT`, a token's position is the number of real tokens before it (in the
        cache and this call): 0..T-1 for an unpadded batch, as transformers' `model(input_ids)`.
        """
        h_BxTxD, cache = self.hidden(tokens_BxT, positions_BxT, mask_BxT, cache)
        return self.logits(h_BxTxD), cache

    def hidden(self, tokens_BxT, positions_BxT=None, mask_BxT=None, cache: KVCache | None = None,
               segment_ids_BxT=None):
        """Final-normed hidden states; `mask_BxT` is False on padding tokens.

        `segment_ids_BxT` (packed rows, r1jax.packing; no cache): 0 on padding, 1..n for the
        examples of a row. A token attends only to earlier tokens of its own example; positions
        default to restarting at 0 where each example begins.
        """
        cfg = self.cfg
        dt = cfg.compute_dtype
        B, T = tokens_BxT.shape
        if segment_ids_BxT is not None:
            if cache is not None:
                raise ValueError("segment_ids_BxT is for packed training rows and cannot be used with a KV cache")
            mask_BxT = segment_ids_BxT > 0 if mask_BxT is None else mask_BxT
            positions_BxT = positions_from_segments(segment_ids_BxT) if positions_BxT is None else positions_BxT
        if mask_BxT is None:
            mask_BxT = jnp.ones((B, T), bool)
        x_BxTxD = self._embed(tokens_BxT)

        if cache is None:
            q_slot_T = jnp.arange(T)
            kv_mask_BxS = mask_BxT
        else:
            q_slot_T = cache.index + jnp.arange(T)
            kv_mask_BxS = jax.lax.dynamic_update_slice(cache.mask_BxS, mask_BxT, (0, cache.index))
        S = kv_mask_BxS.shape[1]
        if positions_BxT is None:
            positions_BxT = positions_from_mask(kv_mask_BxS)
            if cache is not None:
                positions_BxT = jax.lax.dynamic_slice_in_dim(positions_BxT, cache.index, T, axis=1)

        cos_BxTxH, sin_BxTxH = rope_cos_sin(positions_BxT, cfg)
        causal_TxS = jnp.arange(S)[None, :] <= q_slot_T[:, None]
        attn_mask_BxTxS = causal_TxS[None] & kv_mask_BxS[:, None, :]
        if segment_ids_BxT is not None:
            seg_q_BxTx1, seg_k_Bx1xS = segment_ids_BxT[:, :, None], segment_ids_BxT[:, None, :]
            attn_mask_BxTxS &= (seg_q_BxTx1 == seg_k_Bx1xS) & (seg_q_BxTx1 > 0)

        def block(carry, p, i):
            # The cache rides in the carry, each layer's buffer taking a T-token in-place write (the layers are
            # unrolled with a cache: `i` is a Python int).
            x_BxTxD, kv = carry
            q, k, v = self._qkv(x_BxTxD, p, cos_BxTxH, sin_BxTxH)
            if kv is None:
                out = attention(q, k, v, attn_mask_BxTxS, impl=cfg.attn_impl)
            else:
                ks, vs = kv
                k_l = jax.lax.dynamic_update_slice(ks[i], k.transpose(0, 2, 3, 1).astype(ks[i].dtype),
                                                   (0, 0, 0, cache.index))
                v_l = jax.lax.dynamic_update_slice(vs[i], v.swapaxes(1, 2).astype(vs[i].dtype), (0, 0, cache.index, 0))
                kv = (_set(ks, i, k_l), _set(vs, i, v_l))
                out = cached_attention(q, k_l, v_l, attn_mask_BxTxS).astype(dt)
            return self._attn_out_and_mlp(x_BxTxD, out, p), kv

        kv_in = None if cache is None else (cache.k_LxBxKxHxS, cache.v_LxBxKxSxH)
        x_BxTxD, kv_out = self._layers(block, (x_BxTxD, kv_in), unrolled=cache is not None)
        if cache is not None:
            cache = KVCache(kv_out[0], kv_out[1], kv_mask_BxS, cache.index + T)
        return rms_norm(x_BxTxD, self.final_norm.get_value(), cfg.norm_eps), cache

    def prefill_grouped(self, prompt_PxT, prompt_mask_PxT, *, group: int, length: int,
                        dtype=None) -> tuple[jax.Array, KVCache]:
        """Run P left-padded prompts once: the logits (fp32, PxV) after each one's last token, and a decode cache
        of P*group rows (row p*group + g continues prompt p) and `length` slots, the prompt's keys and values
        repeated for each of its rows, the rest empty; laid out like the model's activations."""
        P, T = prompt_PxT.shape
        dtype = dtype or self.cfg.compute_dtype
        h_PxTxD, pcache = self.hidden(prompt_PxT, positions_from_mask(prompt_mask_PxT), prompt_mask_PxT,
                                      KVCache.init(self.cfg, P, T, dtype))
        # Left padding puts every prompt's last token in the last column: only that column needs the vocab head.
        logits_PxV = self.logits(h_PxTxD[:, -1:])[:, 0]
        empty = KVCache.init(self.cfg, P * group, length, dtype)

        def start_with(all_, prompt, axes):
            prompt = jnp.repeat(prompt, group, axis=0)
            return self._constrain(jax.lax.dynamic_update_slice(all_, prompt, (0,) * all_.ndim), axes)

        def layers(all_L, prompt_L):
            return tuple(start_with(a, p, CACHE_AXES) for a, p in zip(all_L, prompt_L))

        return logits_PxV, KVCache(layers(empty.k_LxBxKxHxS, pcache.k_LxBxKxHxS),
                                   layers(empty.v_LxBxKxSxH, pcache.v_LxBxKxSxH),
                                   start_with(empty.mask_BxS, prompt_mask_PxT, ("batch", None)),
                                   jnp.asarray(T, jnp.int32))

    def init_slot_cache(self, rows: int, length: int, dtype=None) -> SlotCache:
        """An empty cache of `rows` decode slots of `length` positions each (the model's compute dtype)."""
        return SlotCache.init(self.cfg, rows, length, dtype)

    def prefill_slots(self, prompt_1xT, length, cache: SlotCache, slots_A) -> tuple[jax.Array, SlotCache]:
        """Run one prompt (right-padded to T, `length` real tokens) and write its keys/values into each row of
        `slots_A` (indices past the cache's rows are ignored, so a fixed-width list can carry fewer slots).
        Returns the logits (fp32, V) after the prompt's last token and the cache with those rows' lengths set.
        The prompt runs alone: its rows' numbers do not depend on what the other rows hold."""
        T = prompt_1xT.shape[1]
        A = slots_A.shape[0]
        real_1xT = jnp.arange(T)[None, :] < length
        h_1xTxD, pcache = self.hidden(prompt_1xT, jnp.arange(T)[None, :], real_1xT,
                                      KVCache.init(self.cfg, 1, T, cache.k_LxBxKxHxS[0].dtype))
        logits_V = self.logits(jax.lax.dynamic_slice_in_dim(h_1xTxD, length - 1, 1, axis=1))[0, 0]

        def write(all_L, new_L, slot_axis):
            at = (slots_A, slice(None), slice(None), slice(None))
            at = at[:slot_axis] + (slice(0, T),) + at[slot_axis + 1:]
            return tuple(a.at[at].set(jnp.broadcast_to(n, (A, *n.shape[1:])), mode="drop") for a, n in zip(all_L, new_L))

        return logits_V, SlotCache(write(cache.k_LxBxKxHxS, pcache.k_LxBxKxHxS, 3),
                                   write(cache.v_LxBxKxSxH, pcache.v_LxBxKxSxH, 2),
                                   cache.lengths_B.at[slots_A].set(length, mode="drop"))

    def decode_slots(self, tokens_B, cache: SlotCache, live_B, *, read_len: int | None = None,
                     impl: DecodeImpl = "xla") -> tuple[jax.Array, SlotCache]:
        """Feed each row's next token at position `lengths_B`; logits (fp32, BxV) and the cache with the live
        rows one longer. Attention reads each row's filled slots only: through the first `read_len` slots of
        the cache on the "xla" path (the caller keeps every live row within it), up to the row's own length
        in the "pallas" kernel. Rows that are not live compute (their slot's stale contents) but do not grow."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        B = tokens_B.shape[0]
        S = cache.v_LxBxKxSxH[0].shape[2]
        read_len = S if read_len is None or impl == "pallas" else min(read_len, S)
        pos_B = cache.lengths_B
        rows_B = jnp.arange(B)
        cos_Bx1xH, sin_Bx1xH = rope_cos_sin(pos_B[:, None], cfg)

        def block(carry, p, i):
            x_Bx1xD, (ks, vs) = carry
            q, k, v = self._qkv(x_Bx1xD, p, cos_Bx1xH, sin_Bx1xH)
            k_l = ks[i].at[rows_B, :, :, pos_B].set(k[:, 0].astype(ks[i].dtype), mode="drop")
            v_l = vs[i].at[rows_B, :, pos_B, :].set(v[:, 0].astype(vs[i].dtype), mode="drop")
            k_win, v_win = (k_l, v_l) if read_len == S else (k_l[..., :read_len], v_l[:, :, :read_len])
            out_BxNxH = ragged_decode_attention(q[:, 0], k_win, v_win, pos_B + 1, impl=impl)
            return (self._attn_out_and_mlp(x_Bx1xD, out_BxNxH[:, None].astype(dt), p),
                    (_set(ks, i, k_l), _set(vs, i, v_l)))

        x_Bx1xD, (ks, vs) = self._layers(block, (self._embed(tokens_B[:, None]),
                                                 (cache.k_LxBxKxHxS, cache.v_LxBxKxSxH)), unrolled=True)
        h_Bx1xD = rms_norm(x_Bx1xD, self.final_norm.get_value(), cfg.norm_eps)
        return self.logits(h_Bx1xD)[:, 0], SlotCache(ks, vs, pos_B + live_B.astype(jnp.int32))

    def hidden_shared_prompt(self, prompt_QxTp, prompt_mask_QxTp, tokens_BxT, mask_BxT, share: int):
        """Final-normed hidden states of Q left-padded prompts and of B = Q * `share` continuations, row b
        continuing prompt b // share: (h_QxTpxD, h_BxTxD).

        Equal to `hidden` over each row's prompt + continuation, but every prompt runs once for its `share`
        rows (GRPO's G completions of one prompt share it): the per-token work (projections, MLP) covers
        Q*Tp + B*T tokens instead of B*(Tp + T). A continuation attends to its prompt's keys and values,
        repeated `share` times (so their gradients sum over the rows), then to its own earlier tokens.
        """
        cfg = self.cfg
        Q, Tp = prompt_QxTp.shape
        B, T = tokens_BxT.shape
        if B != Q * share:
            raise ValueError(f"{B} continuation rows are not {Q} prompts x share={share}")
        repeat = lambda x: jnp.repeat(x, share, axis=0)  # noqa: E731
        pos_QxTp = positions_from_mask(prompt_mask_QxTp)
        prompt_len_B = repeat(jnp.sum(prompt_mask_QxTp, axis=1, dtype=jnp.int32))
        pos_BxT = prompt_len_B[:, None] + jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1
        cos_p, sin_p = rope_cos_sin(pos_QxTp, cfg)
        cos_c, sin_c = rope_cos_sin(pos_BxT, cfg)
        mask_p = (jnp.arange(Tp)[None, :] <= jnp.arange(Tp)[:, None])[None] & prompt_mask_QxTp[:, None, :]
        causal_TxT = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
        mask_c = jnp.concatenate([jnp.broadcast_to(repeat(prompt_mask_QxTp)[:, None, :], (B, T, Tp)),
                                  causal_TxT[None] & mask_BxT[:, None, :]], axis=2)

        def block(carry, p, i):
            x_p, x_c = carry
            q_p, k_p, v_p = self._qkv(x_p, p, cos_p, sin_p)
            q_c, k_c, v_c = self._qkv(x_c, p, cos_c, sin_c)
            out_p = attention(q_p, k_p, v_p, mask_p, impl=cfg.attn_impl)
            k_all = jnp.concatenate([repeat(k_p), k_c], axis=1)
            v_all = jnp.concatenate([repeat(v_p), v_c], axis=1)
            out_c = attention(q_c, k_all, v_all, mask_c, impl=cfg.attn_impl)
            return self._attn_out_and_mlp(x_p, out_p, p), self._attn_out_and_mlp(x_c, out_c, p)

        x_p, x_c = self._layers(block, (self._embed(prompt_QxTp), self._embed(tokens_BxT)))
        norm = lambda x: rms_norm(x, self.final_norm.get_value(), cfg.norm_eps)  # noqa: E731
        return norm(x_p), norm(x_c)

    def _embed(self, tokens_BxT):
        x_BxTxD = jnp.take(self.embed.get_value(), tokens_BxT, axis=0).astype(self.cfg.compute_dtype)
        return self._constrain(x_BxTxD, ("batch", None, None))

    def _qkv(self, x_BxTxD, p, cos_BxTxH, sin_BxTxH):
        """One layer's roped queries, keys and values of x."""
        cfg = self.cfg
        h = rms_norm(x_BxTxD, p["attn_norm"], cfg.norm_eps)
        q = jnp.einsum("BTD,DNH->BTNH", h, p["wq"])
        k = jnp.einsum("BTD,DKH->BTKH", h, p["wk"])
        v = jnp.einsum("BTD,DKH->BTKH", h, p["wv"])
        if cfg.qkv_bias:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        if cfg.qk_norm:
            q = rms_norm(q, p["q_norm"], cfg.norm_eps)
            k = rms_norm(k, p["k_norm"], cfg.norm_eps)
        q = self._constrain(apply_rope(q, cos_BxTxH, sin_BxTxH), ("batch", None, "heads", None))
        k = self._constrain(apply_rope(k, cos_BxTxH, sin_BxTxH), ("batch", None, "kv_heads", None))
        v = self._constrain(v, ("batch", None, "kv_heads", None))
        return q, k, v

    def _attn_out_and_mlp(self, x_BxTxD, out_BxTxNxH, p):
        """The rest of a layer after attention: output projection, residual, MLP, residual."""
        x_BxTxD = x_BxTxD + jnp.einsum("BTNH,NHD->BTD", out_BxTxNxH, p["wo"])
        h = rms_norm(x_BxTxD, p["mlp_norm"], self.cfg.norm_eps)
        constrain = no_constraint if self.act_sharding is None else self.act_sharding.constrain
        x_BxTxD = x_BxTxD + gated_mlp(h, p["w_gate"], p["w_up"], p["w_down"], constrain)
        return self._constrain(x_BxTxD, ("batch", None, None))

    def _layers(self, block, carry, *, unrolled: bool = False):
        """`carry = block(carry, params of layer i in the compute dtype, i)` for every layer, each layer
        rematerialised in the backward pass as `cfg.remat` says. Stacked weights run as one scan (`i` traced) when
        `cfg.scan_layers` and not `unrolled`, else unrolled (`i` a Python int), as per-layer weights always are."""
        cfg, dt = self.cfg, self.cfg.compute_dtype

        def step(carry, layer):
            p, i = layer
            return block(carry, {name: w.astype(dt) for name, w in p.items()}, i), None

        if cfg.remat == "full":
            step = jax.checkpoint(step, prevent_cse=False)
        elif cfg.remat == "dots":
            step = jax.checkpoint(step, prevent_cse=False, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
        if isinstance(self.layers, nnx.List):  # per-layer weights (`per_layer_view`)
            for i, layer in enumerate(self.layers):
                carry, _ = step(carry, ({name: w.get_value() for name, w in layer.items()}, i))
            return carry
        params = {name: w.get_value() for name, w in self.layers.items()}
        if cfg.scan_layers and not unrolled:
            return jax.lax.scan(step, carry, (params, jnp.arange(cfg.n_layers)))[0]
        for i in range(cfg.n_layers):
            carry, _ = step(carry, ({name: w[i] for name, w in params.items()}, i))
        return carry

    def per_layer_view(self, dtype=None) -> "Transformer":
        """A new module on the same config whose layer weights are L separate arrays (each layer's without the
        leading layer axis) and whose layer weights, embedding and head are in `dtype` (default: as stored): what
        decoding reads. The forward casts exactly those to the compute dtype itself, so casting to it here changes
        no number. Stacked weights are sliced per layer inside every program that runs them, and a slice is a copy
        on XLA's CPU backend: a decode loop would copy every weight at every step. Works under jit and eval_shape
        (r1jax.sharding.for_sampling builds it in one program)."""
        graphdef, state = nnx.split(self)
        view = nnx.merge(graphdef, state)
        cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))  # noqa: E731

        def param(value, axes):
            return nnx.Param(cast(value), axes=axes)

        view.layers = nnx.List([
            nnx.Dict({name: param(w.get_value()[i], w.get_metadata()["axes"][1:]) for name, w in self.layers.items()})
            for i in range(self.cfg.n_layers)])
        view.embed = param(self.embed.get_value(), self.embed.get_metadata()["axes"])
        if not self.cfg.tie_embeddings:
            view.lm_head = param(self.lm_head.get_value(), self.lm_head.get_metadata()["axes"])
        return view

    def head_weight_DxV(self) -> jax.Array:
        return self.embed.get_value().T if self.cfg.tie_embeddings else self.lm_head.get_value()

    def logits(self, h_BxTxD):
        w_DxV = self.head_weight_DxV().astype(h_BxTxD.dtype)
        logits = jnp.einsum("BTD,DV->BTV", h_BxTxD, w_DxV, preferred_element_type=jnp.float32)
        return self._constrain(logits, ("batch", None, "vocab"))

    def token_logprobs(self, tokens_BxT, positions_BxT, mask_BxT, targets_BxT, *,
                       temperature: float = 1.0, chunk: int = 256):
        """log_softmax(logits / temperature) at `targets_BxT`, and the entropy.

        Never holds the full fp32 BxTxV logits: the head runs over chunks of `chunk`
        positions in a loop, each chunk's logits recomputed in the backward pass when they
        exceed HEAD_REMAT_BYTES, so forward and backward both peak at one BxchunkxV block
        (what RL on 150k-vocab models needs).
        """
        h_BxTxD, _ = self.hidden(tokens_BxT, positions_BxT, mask_BxT)
        return chunked_logprobs(h_BxTxD, self.head_weight_DxV(), targets_BxT,
                                temperature=temperature, chunk=chunk)


# A chunk's fp32 logits up to this size are kept for the backward pass; larger ones are recomputed there
# (a 150k vocabulary at 64 rows x 256 positions is 10 GB).
HEAD_REMAT_BYTES = 1 << 28


def chunked_logprobs(h_BxTxD, w_DxV, targets_BxT, *, temperature: float = 1.0, chunk: int = 256):
    """(logp_BxT, entropy_BxT) of the head `w_DxV` over `h`, one chunk of T at a time."""
    B, T, D = h_BxTxD.shape
    V = w_DxV.shape[1]
    chunk = min(chunk, T)
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    h_CxBxtxD = h.reshape(B, n_chunks, chunk, D).swapaxes(0, 1)
    tgt_CxBxt = tgt.reshape(B, n_chunks, chunk).swapaxes(0, 1)
    w_DxV = w_DxV.astype(h_BxTxD.dtype)

    def one(args):
        h_Bxtxd, tgt_Bxt = args
        logits = jnp.einsum("BTD,DV->BTV", h_Bxtxd, w_DxV, preferred_element_type=jnp.float32)
        logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, tgt_Bxt[..., None], axis=-1)[..., 0] - lse
        # Entropy from the same logits and lse (one more exp, no second softmax), outside the gradient.
        fixed, fixed_lse = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(lse)
        entropy = fixed_lse - jnp.sum(jnp.exp(fixed - fixed_lse[..., None]) * fixed, axis=-1)
        return logp, entropy

    if B * chunk * V * 4 > HEAD_REMAT_BYTES:
        one = jax.checkpoint(one)
    logp_CxBxt, ent_CxBxt = jax.lax.map(one, (h_CxBxtxD, tgt_CxBxt))
    logp_BxT = logp_CxBxt.swapaxes(0, 1).reshape(B, -1)[:, :T]
    ent_BxT = ent_CxBxt.swapaxes(0, 1).reshape(B, -1)[:, :T]
    return logp_BxT, ent_BxT


def create_model(
    cfg: ModelConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.TRAIN_RULES,
    seed: int = 0,
) -> Transformer:
    """A randomly initialised model, created directly on its shards."""
    mesh = sharding.MeshConfig().make() if mesh is None else mesh
    act = ActivationSharding(mesh, rules)
    return sharding.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed), act_sharding=act), mesh, rules)


def _set(items: tuple, i: int, value) -> tuple:
    return items[:i] + (value,) + items[i + 1:]


def rope_cos_sin(positions_BxT, cfg: ModelConfig):
    """(cos, sin) of every position's rotary angles, each B x T x head_dim."""
    angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * rope_frequencies(cfg)
    angles_BxTxH = jnp.concatenate([angles_BxTxH2, angles_BxTxH2], axis=-1)
    return jnp.cos(angles_BxTxH), jnp.sin(angles_BxTxH)


def positions_from_mask(mask_BxT):
    """Per-row positions for left-padded rows: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids_BxT):
    """Positions in packed rows: 0 where each segment (example) begins, then 1, 2, ...; 0 on padding."""
    t_T = jnp.arange(segment_ids_BxT.shape[1])
    starts_BxT = jnp.concatenate([jnp.ones_like(segment_ids_BxT[:, :1], bool),
                                  segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    first_BxT = jax.lax.cummax(jnp.where(starts_BxT, t_T, 0), axis=1)
    return jnp.where(segment_ids_BxT > 0, t_T - first_BxT, 0)
