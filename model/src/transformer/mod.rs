//! The Llama 3.x / Qwen2.5 decoder-only transformer: token embedding, `num_hidden_layers`
//! blocks of (RMSNorm → grouped-query attention with RoPE) and (RMSNorm → SwiGLU MLP), final
//! RMSNorm and the LM head. Numerics follow transformers' `LlamaForCausalLM` /
//! `Qwen2ForCausalLM` (RMSNorm in f32, RoPE tables in f32).
//!
//! One layer stack serves inference and training; they differ in where attention finds keys and
//! values besides the span's own (`KvSource`), in which slots are computed (`SpanTokens`: the
//! training step skips padding) and in the `no_grad` guard, which only the inference entry
//! points take.
//!
//! Files: `linear` (Linear, RmsNorm), `rope`, `attention`, `mlp`, `block` (one layer), `span`
//! (what a pass's layers share), `forward` (the entry points and the layer stack), `recompute`
//! (training with activation recomputation), this file (the model's parameters).
//!
//! Shapes: B batch, T new tokens, P past slots, S = P + T slots, D hidden, H query heads,
//! KV key/value heads, hd head_dim, I intermediate, V vocab.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{load_config, load_tensors};
use crate::config::ModelConfig;

mod attention;
mod block;
mod forward;
mod linear;
mod mlp;
mod recompute;
mod rope;
mod span;

use attention::Attention;
use block::Block;
use linear::{Linear, RmsNorm};
use mlp::Mlp;
pub(crate) use recompute::backward_with_gradient;
pub(crate) use span::SpanTokens;

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
        let inv_freq = rope::inv_freq(&config, device);
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
