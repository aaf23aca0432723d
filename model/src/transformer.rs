//! The Llama 3.x / Qwen2.5 decoder-only transformer: token embedding, `num_hidden_layers`
//! blocks of (RMSNorm → grouped-query attention with RoPE) and (RMSNorm → SwiGLU MLP), final
//! RMSNorm and the LM head. Numerics follow transformers' `LlamaForCausalLM` /
//! `Qwen2ForCausalLM` (RMSNorm in f32, RoPE tables in f32).
//!
//! One layer stack serves inference and training; they differ in where attention finds keys and
//! values besides the span's own (`KvSource`) and in the `no_grad` guard, which only the
//! inference entry points take.
//!
//! Shapes: B batch, T new tokens, P past slots, S = P + T slots, D hidden, H query heads,
//! KV key/value heads, hd head_dim, I intermediate, V vocab.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{load_config, load_tensors};
use crate::config::{ModelConfig, RopeScaling};
use crate::kv_cache::KvCache;

/// Where a forward pass's token ids come from: given by a caller (range-checked against the
/// vocabulary, which waits for the device), or known to be in range: sampled from this
/// vocabulary's logits, or checked on the host by the caller (decoding and training must not sync
/// with the device per token or per micro-batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdsOrigin {
    Given,
    InRange,
}

/// Where `forward_with_taps` reports activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TapPoint {
    /// Output of input_layernorm, [B, T, D].
    AttnNormOut,
    /// Output of post_attention_layernorm, [B, T, D].
    MlpNormOut,
    /// Input of down_proj, act(gate) * up, [B, T, I].
    DownProjIn,
}

type Tap<'a> = Option<&'a mut dyn FnMut(usize, TapPoint, &Tensor)>;

/// Where attention finds keys and values besides those of the span being run.
enum KvSource<'a> {
    /// Only the span itself.
    None,
    /// The inference cache: each layer appends the span's K/V and attends to all slots.
    Cache(&'a mut KvCache),
    /// Training: per layer (K, V) [B, KV, P, hd] that are only read, concatenated with the
    /// span's own (a new tensor, so autograd flows into the span's K/V and never into past).
    Past(&'a [(Tensor, Tensor)]),
    /// Frozen prefill: no past; each layer's K/V after RoPE is pushed here.
    Record(&'a mut Vec<(Tensor, Tensor)>),
}

#[derive(Debug)]
struct Linear {
    /// [out, in]
    weight: Tensor,
    /// [out]
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

#[derive(Debug)]
struct RmsNorm {
    /// [D]
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// x * rsqrt(mean(x²) + eps) computed in f32, cast back, then scaled (transformers' order).
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.square().mean_dim(-1, true, Kind::Float);
        let normed = (x32 * (variance + self.eps).rsqrt()).to_kind(kind);
        &self.weight * normed
    }
}

/// Rotary embedding: inverse frequencies [hd/2] (f32), with the Llama 3 smoothing if configured.
fn rope_inv_freq(config: &ModelConfig, device: Device) -> Tensor {
    let dim = config.head_dim;
    let inv_freq: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    let inv_freq = match config.rope_scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old_context = original_max_position_embeddings as f64;
            let low_freq_wavelen = old_context / low_freq_factor;
            let high_freq_wavelen = old_context / high_freq_factor;
            inv_freq
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f // high frequencies are kept
                    } else if wavelen > low_freq_wavelen {
                        f / factor // low frequencies are scaled
                    } else {
                        // in between: interpolate
                        let smooth = (old_context / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    };
    Tensor::from_slice(&inv_freq)
        .to_kind(Kind::Float)
        .to_device(device)
}

/// cos and sin tables [B, 1, T, hd] in `kind` for rope positions [B, T].
fn rope_tables(inv_freq: &Tensor, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
    // [B, T, 1] * [hd/2] -> [B, T, hd/2]
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
    let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

/// x * cos + rotate_half(x) * sin, x [B, heads, T, hd]; cos/sin in x's kind.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], 3);
    x * cos + rotated * sin
}

/// The RoPE tables in `x`'s kind: under autocast q/k come out of the projections in the
/// autocast kind, not the model's (a no-op when the kinds agree, as in inference).
fn rope_tables_like(cos: &Tensor, sin: &Tensor, x: &Tensor) -> (Tensor, Tensor) {
    if cos.kind() == x.kind() {
        (cos.shallow_clone(), sin.shallow_clone())
    } else {
        (cos.to_kind(x.kind()), sin.to_kind(x.kind()))
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    /// x [B, T, D] -> queries [B, H, T, hd] after RoPE.
    fn queries(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let q = self
            .q_proj
            .forward(x)
            .view([b, t, self.num_heads, self.head_dim])
            .transpose(1, 2);
        let (cos, sin) = rope_tables_like(cos, sin, &q);
        apply_rope(&q, &cos, &sin)
    }

    /// x [B, T, D] -> this span's keys (after RoPE) and values, each [B, KV, T, hd].
    fn key_values(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let k = self
            .k_proj
            .forward(x)
            .view([b, t, self.num_kv_heads, self.head_dim])
            .transpose(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .view([b, t, self.num_kv_heads, self.head_dim])
            .transpose(1, 2);
        let (cos, sin) = rope_tables_like(cos, sin, &k);
        (apply_rope(&k, &cos, &sin), v)
    }

    /// x [B, T, D]; mask [B, 1, T, S] bool (true = may attend) -> [B, T, D].
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        layer: usize,
        kv: &mut KvSource,
    ) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let q = self.queries(x, cos, sin);
        let (k, v) = self.key_values(x, cos, sin);
        // [B, KV, S, hd]
        let (k, v) = match kv {
            KvSource::None => (k, v),
            KvSource::Cache(cache) => cache.append(layer, &k, &v),
            KvSource::Past(past) => {
                let (past_k, past_v) = &past[layer];
                (
                    Tensor::cat(&[&past_k.to_kind(k.kind()), &k], 2),
                    Tensor::cat(&[&past_v.to_kind(v.kind()), &v], 2),
                )
            }
            KvSource::Record(out) => {
                out.push((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
        };
        let gqa = self.num_heads != self.num_kv_heads;
        let out =
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, None, gqa);
        // [B, H, T, hd] -> [B, T, H*hd]
        let out = out
            .transpose(1, 2)
            .reshape([b, t, self.num_heads * self.head_dim]);
        self.o_proj.forward(&out)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, layer: usize, tap: &mut Tap) -> Tensor {
        // [B, T, I]
        let hidden = self.gate_proj.forward(x).silu() * self.up_proj.forward(x);
        if let Some(tap) = tap.as_mut() {
            tap(layer, TapPoint::DownProjIn, &hidden);
        }
        self.down_proj.forward(&hidden)
    }
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        layer: usize,
        kv: &mut KvSource,
        tap: &mut Tap,
    ) -> Tensor {
        let normed = self.input_layernorm.forward(x);
        if let Some(tap) = tap.as_mut() {
            tap(layer, TapPoint::AttnNormOut, &normed);
        }
        let x = x + self.self_attn.forward(&normed, cos, sin, mask, layer, kv);
        let normed = self.post_attention_layernorm.forward(&x);
        if let Some(tap) = tap.as_mut() {
            tap(layer, TapPoint::MlpNormOut, &normed);
        }
        &x + self.mlp.forward(&normed, layer, tap)
    }
}

impl<'a> From<Option<&'a mut KvCache>> for KvSource<'a> {
    fn from(cache: Option<&'a mut KvCache>) -> Self {
        match cache {
            Some(cache) => KvSource::Cache(cache),
            None => KvSource::None,
        }
    }
}

#[derive(Debug)]
pub struct Transformer {
    pub config: ModelConfig,
    /// [V, D]
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// [V, D]; the same storage as `embed_tokens` when tied.
    lm_head: Tensor,
    /// [hd/2] f32
    inv_freq: Tensor,
}

impl Transformer {
    /// Loads `config.json` (+ generation_config.json) and the safetensors weights of a checkpoint directory.
    pub fn load(dir: &Path, device: Device, dtype: Kind) -> Result<Self> {
        let config = load_config(dir)?;
        let tensors = load_tensors(dir, &config, device, dtype)?;
        Self::from_tensors(config, tensors)
    }

    /// Builds the model from HF-named tensors (all on one device, one dtype); shapes are checked.
    pub fn from_tensors(
        config: ModelConfig,
        mut tensors: BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        let expected = config.parameter_shapes();
        for (name, shape) in &expected {
            let t = tensors
                .get(name)
                .ok_or_else(|| anyhow!("missing tensor {name}"))?;
            if &t.size() != shape {
                bail!("tensor {name} has shape {:?}, expected {shape:?}", t.size());
            }
        }
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(extra) = tensors.keys().find(|n| {
            !known.contains(n.as_str()) && !(config.tie_word_embeddings && *n == "lm_head.weight")
        }) {
            bail!("unexpected tensor {extra} for this config");
        }
        let embed = &tensors["model.embed_tokens.weight"];
        let (device, kind) = (embed.device(), embed.kind());
        if let Some((name, t)) = tensors
            .iter()
            .find(|(_, t)| t.device() != device || t.kind() != kind)
        {
            bail!(
                "tensor {name} is {:?} on {:?}, the embedding is {kind:?} on {device:?}",
                t.kind(),
                t.device()
            );
        }
        let mut take = |name: String| -> Result<Tensor> {
            tensors
                .remove(&name)
                .ok_or_else(|| anyhow!("missing tensor {name}"))
        };
        let eps = config.rms_norm_eps;
        let linear = |take: &mut dyn FnMut(String) -> Result<Tensor>,
                      prefix: &str,
                      bias: bool|
         -> Result<Linear> {
            Ok(Linear {
                weight: take(format!("{prefix}.weight"))?,
                bias: if bias {
                    Some(take(format!("{prefix}.bias"))?)
                } else {
                    None
                },
            })
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = config.attention_bias;
            layers.push(Block {
                input_layernorm: RmsNorm {
                    weight: take(format!("{p}.input_layernorm.weight"))?,
                    eps,
                },
                self_attn: Attention {
                    q_proj: linear(&mut take, &format!("{p}.self_attn.q_proj"), bias)?,
                    k_proj: linear(&mut take, &format!("{p}.self_attn.k_proj"), bias)?,
                    v_proj: linear(&mut take, &format!("{p}.self_attn.v_proj"), bias)?,
                    o_proj: linear(&mut take, &format!("{p}.self_attn.o_proj"), false)?,
                    num_heads: config.num_attention_heads as i64,
                    num_kv_heads: config.num_key_value_heads as i64,
                    head_dim: config.head_dim as i64,
                },
                post_attention_layernorm: RmsNorm {
                    weight: take(format!("{p}.post_attention_layernorm.weight"))?,
                    eps,
                },
                mlp: Mlp {
                    gate_proj: linear(&mut take, &format!("{p}.mlp.gate_proj"), false)?,
                    up_proj: linear(&mut take, &format!("{p}.mlp.up_proj"), false)?,
                    down_proj: linear(&mut take, &format!("{p}.mlp.down_proj"), false)?,
                },
            });
        }
        let embed_tokens = take("model.embed_tokens.weight".to_string())?;
        let norm = RmsNorm {
            weight: take("model.norm.weight".to_string())?,
            eps,
        };
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            take("lm_head.weight".to_string())?
        };
        let inv_freq = rope_inv_freq(&config, device);
        Ok(Transformer {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// All parameters under their HF names (shallow clones sharing storage); `lm_head.weight`
    /// only when untied.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        let mut put = |name: String, t: &Tensor| {
            out.insert(name, t.shallow_clone());
        };
        put("model.embed_tokens.weight".into(), &self.embed_tokens);
        for (i, block) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            put(
                format!("{p}.input_layernorm.weight"),
                &block.input_layernorm.weight,
            );
            put(
                format!("{p}.post_attention_layernorm.weight"),
                &block.post_attention_layernorm.weight,
            );
            let a = &block.self_attn;
            for (name, lin) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                put(format!("{p}.self_attn.{name}.weight"), &lin.weight);
                if let Some(b) = &lin.bias {
                    put(format!("{p}.self_attn.{name}.bias"), b);
                }
            }
            let m = &block.mlp;
            for (name, lin) in [
                ("gate_proj", &m.gate_proj),
                ("up_proj", &m.up_proj),
                ("down_proj", &m.down_proj),
            ] {
                put(format!("{p}.mlp.{name}.weight"), &lin.weight);
            }
        }
        put("model.norm.weight".into(), &self.norm.weight);
        if !self.config.tie_word_embeddings {
            put("lm_head.weight".into(), &self.lm_head);
        }
        out
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    /// Logits [B, T, V] (in the model's dtype).
    ///
    /// ids [B, T] i64; positions [B, T] i64 (rope positions, e.g. cumsum(mask) - 1);
    /// attention_mask [B, S] with S = cached slots + T (1 = real token, 0 = padding).
    /// With a cache, the step attends to the cached K/V first and appends its own.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(ids, positions, attention_mask, cache.into(), None, IdsOrigin::Given)?;
        Ok(self.lm_head(&hidden))
    }

    /// `forward` for a decode step whose ids were sampled from the logits of a model with this
    /// vocabulary (checked once, before generation, by `check_two_stage`): the per-step range check
    /// would copy two values from the device and wait for it, every token.
    pub fn forward_sampled(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let kv = KvSource::Cache(cache);
        let hidden = self.hidden(ids, positions, attention_mask, kv, None, IdsOrigin::InRange)?;
        Ok(self.lm_head(&hidden))
    }

    /// `forward` without a cache that also reports the activations of every layer at the
    /// three `TapPoint`s (for calibration).
    pub fn forward_with_taps(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        tap: &mut dyn FnMut(usize, TapPoint, &Tensor),
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(ids, positions, attention_mask, KvSource::None, Some(tap), IdsOrigin::Given)?;
        Ok(self.lm_head(&hidden))
    }

    /// Final hidden states [B, T, D] (after the last norm), without the LM head.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.hidden(ids, positions, attention_mask, cache.into(), None, IdsOrigin::Given)
    }

    /// Logits [B, T, V] with autograd on (training). ids/positions [B, T] i64;
    /// attention_mask [B, P + T]; `past`: per layer (K, V) [B, KV, P, hd] (e.g. another model's
    /// `prefill_kv`), only read: the span attends to them first, then causally to itself.
    pub fn forward_train(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        past: Option<&[(Tensor, Tensor)]>,
    ) -> Result<Tensor> {
        let hidden = self.forward_train_hidden(ids, positions, attention_mask, past)?;
        Ok(self.lm_head(&hidden))
    }

    /// `forward_train` without the LM head: final hidden states [B, T, D].
    pub fn forward_train_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        past: Option<&[(Tensor, Tensor)]>,
    ) -> Result<Tensor> {
        self.forward_train_hidden_checked(ids, positions, attention_mask, past, IdsOrigin::Given)
    }

    /// `forward_train_hidden` for ids whose range the caller checked on the host.
    pub(crate) fn forward_train_hidden_checked(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        past: Option<&[(Tensor, Tensor)]>,
        ids_origin: IdsOrigin,
    ) -> Result<Tensor> {
        let kv = match past {
            Some(past) => KvSource::Past(past),
            None => KvSource::None,
        };
        self.hidden(ids, positions, attention_mask, kv, None, ids_origin)
    }

    /// The frozen prefill (no grad): per layer (K, V) after RoPE, each [B, KV, T, hd] in the
    /// model's dtype, for another model's `forward_train`. Inputs as in `forward`.
    pub fn prefill_kv(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        self.prefill_kv_checked(ids, positions, attention_mask, IdsOrigin::Given)
    }

    /// `prefill_kv` for ids whose range the caller checked on the host (training batches).
    pub(crate) fn prefill_kv_checked(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        ids_origin: IdsOrigin,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let _guard = tch::no_grad_guard();
        let mut kv = Vec::with_capacity(self.layers.len());
        let (x, span) =
            self.embed_span(ids, positions, attention_mask, &KvSource::None, ids_origin)?;
        // Every layer but the last runs whole, recording its K/V. The last layer's K/V depend only
        // on its input: its queries, attention output, MLP and the final norm would feed nothing.
        let Some((last, layers)) = self.layers.split_last() else {
            return Ok(kv);
        };
        let mut x = x;
        let mut record = KvSource::Record(&mut kv);
        for (i, block) in layers.iter().enumerate() {
            x = block.forward(&x, &span.cos, &span.sin, &span.mask, i, &mut record, &mut None);
        }
        let normed = last.input_layernorm.forward(&x);
        kv.push(last.self_attn.key_values(&normed, &span.cos, &span.sin));
        Ok(kv)
    }

    /// The LM head: hidden [.., D] -> logits [.., V].
    pub fn lm_head(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<&Tensor>(&self.lm_head, None)
    }

    /// Checks the inputs so that the tensor ops below cannot fail on user data.
    fn check_inputs(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        kv: &KvSource,
        ids_origin: IdsOrigin,
    ) -> Result<(i64, i64, i64)> {
        let ids_size = ids.size();
        if ids_size.len() != 2 || ids_size[1] == 0 {
            bail!("token ids must be [batch, tokens] with tokens > 0, got {ids_size:?}");
        }
        let (b, t) = (ids_size[0], ids_size[1]);
        if ids.kind() != Kind::Int64 || positions.kind() != Kind::Int64 {
            bail!(
                "token ids and positions must be i64, got {:?} and {:?}",
                ids.kind(),
                positions.kind()
            );
        }
        if positions.size() != ids_size {
            bail!(
                "positions {:?} must have the shape of the token ids {ids_size:?}",
                positions.size()
            );
        }
        let past = match kv {
            KvSource::Cache(c) => {
                if c.num_layers() != self.layers.len() {
                    bail!(
                        "KV cache has {} layers, the model {}",
                        c.num_layers(),
                        self.layers.len()
                    );
                }
                if let Some(cb) = c.batch_size() {
                    if cb != b {
                        bail!("KV cache holds a batch of {cb}, this step has {b} rows");
                    }
                }
                c.len() as i64
            }
            KvSource::Past(past) => self.check_past(past, b)?,
            KvSource::None | KvSource::Record(_) => 0,
        };
        if attention_mask.size() != [b, past + t] {
            bail!(
                "attention mask {:?} must be [batch, cached + new] = [{b}, {}]",
                attention_mask.size(),
                past + t
            );
        }
        for dev in [ids.device(), positions.device(), attention_mask.device()] {
            if dev != self.device() {
                bail!(
                    "inputs must be on the model's device {:?}, got {dev:?}",
                    self.device()
                );
            }
        }
        if ids_origin == IdsOrigin::Given {
            let (min, max) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            if min < 0 || max >= self.config.vocab_size as i64 {
                bail!(
                    "token id out of range [0, {}): min {min}, max {max}",
                    self.config.vocab_size
                );
            }
        }
        Ok((b, t, past))
    }

    /// Past K/V for `forward_train`: one (K, V) per layer, all [B, KV, P, hd] with one P.
    fn check_past(&self, past: &[(Tensor, Tensor)], batch: i64) -> Result<i64> {
        if past.len() != self.layers.len() {
            bail!(
                "past K/V has {} layers, the model {}",
                past.len(),
                self.layers.len()
            );
        }
        let slots = past[0].0.size().get(2).copied().unwrap_or(0);
        let expected = [
            batch,
            self.config.num_key_value_heads as i64,
            slots,
            self.config.head_dim as i64,
        ];
        for (i, (k, v)) in past.iter().enumerate() {
            if k.size() != expected || v.size() != expected {
                bail!(
                    "past K/V of layer {i}: K {:?} and V {:?} must both be [batch, kv_heads, slots, head_dim] = {expected:?}",
                    k.size(),
                    v.size()
                );
            }
            if k.device() != self.device() || v.device() != self.device() {
                bail!(
                    "past K/V of layer {i} must be on the model's device {:?}",
                    self.device()
                );
            }
        }
        Ok(slots)
    }

    /// The token embeddings [B, T, D] of a span and what all its layers share, after checking
    /// the inputs.
    fn embed_span(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        kv: &KvSource,
        ids_origin: IdsOrigin,
    ) -> Result<(Tensor, Span)> {
        let (_b, t, past) = self.check_inputs(ids, positions, attention_mask, kv, ids_origin)?;
        let device = self.device();
        // mask [B, 1, T, S]: query i (slot past+i) sees real slots j <= past+i, and always
        // itself, so that padding queries stay finite (their outputs are never used).
        let s = past + t;
        let query_slot = Tensor::arange_start(past, s, (Kind::Int64, device)).view([t, 1]);
        let key_slot = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
        let causal = key_slot.le_tensor(&query_slot); // [T, S]
        let diagonal = key_slot.eq_tensor(&query_slot);
        let real = attention_mask.ne(0).view([-1, 1, 1, s]); // [B, 1, 1, S]
        let mask = real.logical_and(&causal).logical_or(&diagonal);
        let (cos, sin) = rope_tables(&self.inv_freq, positions, self.kind());
        let x = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        Ok((x, Span { mask, cos, sin }))
    }

    /// The layer stack: final hidden states [B, T, D]. Autograd follows the caller's mode.
    fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        mut kv: KvSource,
        mut tap: Tap,
        ids_origin: IdsOrigin,
    ) -> Result<Tensor> {
        let (mut x, span) = self.embed_span(ids, positions, attention_mask, &kv, ids_origin)?;
        if let KvSource::Cache(c) = &mut kv {
            c.set_attention_mask(&attention_mask.to_kind(Kind::Int64));
        }
        for (i, block) in self.layers.iter().enumerate() {
            x = block.forward(&x, &span.cos, &span.sin, &span.mask, i, &mut kv, &mut tap);
        }
        if let KvSource::Cache(c) = kv {
            c.advance(ids.size()[1] as usize);
        }
        Ok(self.norm.forward(&x))
    }
}

/// What every layer of one forward pass shares.
struct Span {
    /// [B, 1, T, S] bool, true = may attend.
    mask: Tensor,
    /// [B, 1, T, hd] RoPE tables in the model's kind.
    cos: Tensor,
    sin: Tensor,
}

/// Random initialisation in HF layout: every matrix ~ N(0, std), norms 1, biases 0 (transformers'
/// `_init_weights` for Llama/Qwen2 with initializer_range = std). Deterministic for a seed.
pub fn random_tensors(
    config: &ModelConfig,
    std: f64,
    seed: i64,
    device: Device,
    dtype: Kind,
) -> Result<BTreeMap<String, Tensor>> {
    tch::manual_seed(seed);
    let _guard = tch::no_grad_guard();
    let mut out = BTreeMap::new();
    for (name, shape) in config.parameter_shapes() {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu))
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu))
        } else {
            Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * std
        };
        let t = t
            .f_to_dtype(dtype, false, false)
            .and_then(|t| t.f_to_device(device))
            .with_context(|| format!("tensor {name}"))?;
        out.insert(name, t);
    }
    Ok(out)
}
