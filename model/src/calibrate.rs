//! Activation-importance calibration (Minitron-style) for width pruning.
//!
//! The model runs over calibration batches with taps at three points of every layer (outputs of
//! input_layernorm and post_attention_layernorm, input of down_proj). Per sample we take the mean
//! over the *real* tokens of the activation (signed: the paper's reference code, with its padding
//! bug fixed; or of |x|: NVIDIA Model-Optimizer's `abs-mean`), then aggregate over samples with an
//! L2 (or L1) norm. Only running sums over samples are kept, so memory is O(layers × (D + I))
//! whatever the number of samples.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::transformer::{TapPoint, Transformer};

/// How a sample's activations [T, C] become one vector [C].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqAgg {
    /// Mean of the signed activation over real tokens (paper, padding excluded).
    Mean,
    /// Mean of |activation| over real tokens (NVIDIA Model-Optimizer).
    AbsMean,
}

impl FromStr for SeqAgg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(SeqAgg::Mean),
            "abs-mean" => Ok(SeqAgg::AbsMean),
            _ => bail!("unknown --seq-agg {s:?} (expected mean or abs-mean)"),
        }
    }
}

impl fmt::Display for SeqAgg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeqAgg::Mean => "mean",
            SeqAgg::AbsMean => "abs-mean",
        })
    }
}

/// The norm over samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleNorm {
    L2,
    L1,
}

impl FromStr for SampleNorm {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "l2" => Ok(SampleNorm::L2),
            "l1" => Ok(SampleNorm::L1),
            _ => bail!("unknown --norm {s:?} (expected l2 or l1)"),
        }
    }
}

impl fmt::Display for SampleNorm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SampleNorm::L2 => "l2",
            SampleNorm::L1 => "l1",
        })
    }
}

/// One padded batch ready for the model.
pub struct Batch {
    /// [B, T] i64 token ids, right-padded with 0.
    pub ids: Tensor,
    /// [B, T] i64 rope positions 0..T (right padding keeps real tokens at their true positions).
    pub positions: Tensor,
    /// [B, T] i64, 1 = real token.
    pub attention_mask: Tensor,
    /// Real tokens per row.
    pub lengths: Vec<usize>,
}

impl Batch {
    /// Right-pad token rows into a batch on `device`. Empty rows are an error.
    pub fn from_rows(rows: &[Vec<u32>], device: Device) -> Result<Self> {
        if rows.is_empty() {
            bail!("empty calibration batch");
        }
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        if let Some(i) = rows.iter().position(Vec::is_empty) {
            bail!("calibration sample {i} of a batch has no tokens");
        }
        let mut ids = vec![0i64; rows.len() * width];
        let mut mask = vec![0i64; rows.len() * width];
        for (b, row) in rows.iter().enumerate() {
            for (t, &id) in row.iter().enumerate() {
                ids[b * width + t] = id as i64;
                mask[b * width + t] = 1;
            }
        }
        let shape = [rows.len() as i64, width as i64];
        let positions = Tensor::arange(width as i64, (Kind::Int64, device))
            .unsqueeze(0)
            .expand(shape, false)
            .contiguous();
        Ok(Batch {
            ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            positions,
            attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
            lengths: rows.iter().map(Vec::len).collect(),
        })
    }

    pub fn tokens(&self) -> usize {
        self.lengths.iter().sum()
    }
}

/// Sort samples by length (longest first, so a memory problem shows on the first batch) and cut
/// them into batches of `batch_size`; the last batch may be smaller. Fewer samples than one batch,
/// or an empty sample, is an error: the caller asked for a calibration it cannot get.
pub fn length_sorted_batches(mut samples: Vec<Vec<u32>>, batch_size: usize) -> Result<Vec<Vec<Vec<u32>>>> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if samples.is_empty() {
        bail!("the calibration set is empty");
    }
    if samples.len() < batch_size {
        bail!(
            "the calibration set has {} samples, fewer than one batch of {batch_size}",
            samples.len()
        );
    }
    if let Some(i) = samples.iter().position(Vec::is_empty) {
        bail!("calibration sample {i} has no tokens");
    }
    samples.sort_by_key(|s| std::cmp::Reverse(s.len()));
    Ok(samples.chunks(batch_size).map(|c| c.to_vec()).collect())
}

/// Running importance sums over samples.
pub struct ImportanceAccumulator {
    seq_agg: SeqAgg,
    norm: SampleNorm,
    num_layers: usize,
    hidden_size: usize,
    intermediate_size: usize,
    /// [D] f64: Σ_samples g(h_s) where h_s = Σ_layers |m(attn norm)| + |m(mlp norm)|, g = x² or |x|.
    hidden_acc: Tensor,
    /// per layer [I] f64: Σ_samples g(m(down_proj input)).
    intermediate_acc: Vec<Tensor>,
    /// Current batch: [B, 1, T] f32 real-token weights 1/len (so a bmm gives the masked mean).
    mean_weights: Option<Tensor>,
    /// Current batch: [B, D] f32, the per-sample hidden score summed over the layers seen so far.
    batch_hidden: Option<Tensor>,
    /// (layer, point) taps seen in the current batch, to catch a model that skips one.
    taps_seen: usize,
    samples: usize,
    tokens: usize,
    error: Option<anyhow::Error>,
}

impl ImportanceAccumulator {
    pub fn new(config: &ModelConfig, seq_agg: SeqAgg, norm: SampleNorm, device: Device) -> Self {
        let zeros = |n: usize| Tensor::zeros([n as i64], (Kind::Double, device));
        ImportanceAccumulator {
            seq_agg,
            norm,
            num_layers: config.num_hidden_layers,
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            hidden_acc: zeros(config.hidden_size),
            intermediate_acc: (0..config.num_hidden_layers).map(|_| zeros(config.intermediate_size)).collect(),
            mean_weights: None,
            batch_hidden: None,
            taps_seen: 0,
            samples: 0,
            tokens: 0,
            error: None,
        }
    }

    /// Start a batch with its [B, T] real-token mask.
    pub fn begin_batch(&mut self, attention_mask: &Tensor) -> Result<()> {
        let mask = attention_mask.f_to_kind(Kind::Float)?;
        let lengths = mask.f_sum_dim_intlist(1, true, Kind::Float)?; // [B, 1]
        let shortest = lengths.f_min()?.f_double_value(&[])?;
        if shortest < 1.0 {
            bail!("a calibration sample has no real token");
        }
        self.mean_weights = Some(mask.f_div(&lengths)?.f_unsqueeze(1)?); // [B, 1, T]
        let batch = attention_mask.size()[0];
        self.batch_hidden = Some(Tensor::f_zeros([batch, self.hidden_size as i64], (Kind::Float, attention_mask.device()))?);
        self.taps_seen = 0;
        self.tokens += attention_mask.f_sum(Kind::Int64)?.f_int64_value(&[])? as usize;
        Ok(())
    }

    /// The tap callback: records one activation. Errors are kept and reported by `end_batch`, since
    /// the model's callback has no way to return them.
    pub fn observe(&mut self, layer: usize, point: TapPoint, activation: &Tensor) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self.try_observe(layer, point, activation) {
            self.error = Some(e.context(format!("recording activation of layer {layer} ({point:?})")));
        }
    }

    fn try_observe(&mut self, layer: usize, point: TapPoint, activation: &Tensor) -> Result<()> {
        let weights = self.mean_weights.as_ref().ok_or_else(|| anyhow!("observe called outside a batch"))?;
        if layer >= self.num_layers {
            bail!("layer {layer} is beyond the model's {} layers", self.num_layers);
        }
        // [B, T, C] in f32 (no copy when already f32).
        let mut x = activation.f_to_kind(Kind::Float)?;
        if self.seq_agg == SeqAgg::AbsMean {
            x = x.f_abs()?;
        }
        // Masked mean over real tokens: [B,1,T] @ [B,T,C] -> [B,1,C] -> [B,C].
        let per_sample = weights.f_bmm(&x)?.f_squeeze_dim(1)?;
        let width = per_sample.size()[1] as usize;
        match point {
            TapPoint::AttnNormOut | TapPoint::MlpNormOut => {
                if width != self.hidden_size {
                    bail!("activation has {width} channels, hidden size is {}", self.hidden_size);
                }
                let acc = self.batch_hidden.as_mut().ok_or_else(|| anyhow!("observe called outside a batch"))?;
                let _ = acc.f_add_(&per_sample.f_abs()?)?;
            }
            TapPoint::DownProjIn => {
                if width != self.intermediate_size {
                    bail!("activation has {width} channels, intermediate size is {}", self.intermediate_size);
                }
                let contribution = self.over_samples(&per_sample)?;
                let _ = self.intermediate_acc[layer].f_add_(&contribution)?;
            }
        }
        self.taps_seen += 1;
        Ok(())
    }

    /// Σ over the batch's samples of x² (L2) or |x| (L1), in f64: [B, C] -> [C].
    fn over_samples(&self, per_sample: &Tensor) -> Result<Tensor> {
        let x = per_sample.f_to_kind(Kind::Double)?;
        let g = match self.norm {
            SampleNorm::L2 => x.f_square()?,
            SampleNorm::L1 => x.f_abs()?,
        };
        Ok(g.f_sum_dim_intlist(0, false, Kind::Double)?)
    }

    /// Close a batch: folds the per-sample hidden scores into the running sums.
    pub fn end_batch(&mut self) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let expected = 3 * self.num_layers;
        if self.taps_seen != expected {
            bail!("the model reported {} activations for a batch, expected {expected}", self.taps_seen);
        }
        let batch_hidden = self.batch_hidden.take().ok_or_else(|| anyhow!("end_batch without begin_batch"))?;
        let contribution = self.over_samples(&batch_hidden)?;
        let _ = self.hidden_acc.f_add_(&contribution)?;
        self.samples += batch_hidden.size()[0] as usize;
        self.mean_weights = None;
        Ok(())
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    /// The importances: sqrt of the sums of squares (L2) or the sums (L1).
    pub fn finish(&self) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        if self.samples == 0 {
            bail!("no calibration sample was processed");
        }
        let finish_one = |acc: &Tensor| -> Result<Vec<f32>> {
            let v = match self.norm {
                SampleNorm::L2 => acc.f_sqrt()?,
                SampleNorm::L1 => acc.shallow_clone(),
            };
            Ok(Vec::<f32>::try_from(v.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?)?)
        };
        let hidden = finish_one(&self.hidden_acc)?;
        let intermediate = self.intermediate_acc.iter().map(finish_one).collect::<Result<Vec<_>>>()?;
        Ok((hidden, intermediate))
    }
}

/// Channel importances plus how they were made.
#[derive(Debug, Clone, PartialEq)]
pub struct Importance {
    /// [D]
    pub hidden: Vec<f32>,
    /// per layer [I]
    pub intermediate: Vec<Vec<f32>>,
    pub calib_size: usize,
    pub tokens: usize,
    pub seq_agg: SeqAgg,
    pub norm: SampleNorm,
    /// Hash of the model's config.json (see `config_hash`).
    pub model_hash: String,
    /// The model's HF config, for a human reading the file.
    pub model_config: String,
}

/// A stable 64-bit FNV-1a hash of the model's HF config (serde_json writes keys in order).
pub fn config_hash(config: &ModelConfig) -> String {
    let text = config.to_hf_json().to_string();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Importance {
    /// Write `hidden` [D] and `intermediate.{layer}` [I] (f32) with the settings as metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut meta = HashMap::new();
        meta.insert("calib_size".to_string(), self.calib_size.to_string());
        meta.insert("tokens".to_string(), self.tokens.to_string());
        meta.insert("seq_agg".to_string(), self.seq_agg.to_string());
        meta.insert("norm".to_string(), self.norm.to_string());
        meta.insert("model_hash".to_string(), self.model_hash.clone());
        meta.insert("model_config".to_string(), self.model_config.clone());
        meta.insert("num_layers".to_string(), self.intermediate.len().to_string());
        let mut buffers: BTreeMap<String, (Vec<u8>, usize)> = BTreeMap::new();
        buffers.insert("hidden".to_string(), (f32_bytes(&self.hidden), self.hidden.len()));
        for (i, v) in self.intermediate.iter().enumerate() {
            buffers.insert(format!("intermediate.{i}"), (f32_bytes(v), v.len()));
        }
        let views = buffers
            .iter()
            .map(|(name, (bytes, n))| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n], bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| anyhow!("importance tensor {name}: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| anyhow!("serializing importances: {e}"))?;
        // Write next to the target and rename, so a killed run never leaves half a file.
        let tmp = path.with_extension("safetensors.tmp");
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading importance scores {}", path.display()))?;
        let err = |e: safetensors::SafeTensorError| anyhow!("{}: not a valid safetensors file: {e}", path.display());
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(err)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |key: &str| -> Result<String> {
            meta.get(key)
                .cloned()
                .ok_or_else(|| anyhow!("{}: metadata key {key:?} missing (not an importance file?)", path.display()))
        };
        let parse_usize = |key: &str| -> Result<usize> {
            get(key)?.parse().with_context(|| format!("{}: metadata {key} is not a number", path.display()))
        };
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(err)?;
        let read = |name: &str| -> Result<Vec<f32>> {
            let view = st.tensor(name).map_err(|e| anyhow!("{}: tensor {name}: {e}", path.display()))?;
            if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 1 {
                bail!("{}: tensor {name} must be a 1-D f32 vector", path.display());
            }
            Ok(view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let num_layers = parse_usize("num_layers")?;
        Ok(Importance {
            hidden: read("hidden")?,
            intermediate: (0..num_layers).map(|i| read(&format!("intermediate.{i}"))).collect::<Result<_>>()?,
            calib_size: parse_usize("calib_size")?,
            tokens: parse_usize("tokens")?,
            seq_agg: get("seq_agg")?.parse()?,
            norm: get("norm")?.parse()?,
            model_hash: get("model_hash")?,
            model_config: get("model_config")?,
        })
    }

    /// Scores made on another model (other shapes) are refused; a different config hash with the
    /// same shapes is refused too, since the kept channels would be meaningless.
    pub fn check_matches(&self, config: &ModelConfig) -> Result<()> {
        if self.hidden.len() != config.hidden_size
            || self.intermediate.len() != config.num_hidden_layers
            || self.intermediate.iter().any(|v| v.len() != config.intermediate_size)
        {
            bail!(
                "importance scores are for hidden {} / {} layers / intermediate {}, the model has hidden {} / {} layers / intermediate {}",
                self.hidden.len(),
                self.intermediate.len(),
                self.intermediate.first().map(Vec::len).unwrap_or(0),
                config.hidden_size,
                config.num_hidden_layers,
                config.intermediate_size
            );
        }
        let hash = config_hash(config);
        if self.model_hash != hash {
            bail!("importance scores were computed on a model with config hash {}, this model's is {hash}", self.model_hash);
        }
        Ok(())
    }

    /// Kept indices for the given widths (top-k by importance, ascending).
    pub fn plan(&self, hidden_kept: usize, intermediate_kept: usize) -> Result<crate::prune::PrunePlan> {
        Ok(crate::prune::PrunePlan {
            hidden: crate::prune::top_k_indices(&self.hidden, hidden_kept).context("hidden importances")?,
            intermediate: self
                .intermediate
                .iter()
                .enumerate()
                .map(|(i, s)| crate::prune::top_k_indices(s, intermediate_kept).with_context(|| format!("layer {i} importances")))
                .collect::<Result<_>>()?,
        })
    }
}

/// Mean next-token cross-entropy over real tokens (input and target both real).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LossStats {
    pub loss: f64,
    pub tokens: usize,
}

/// Add one batch's summed next-token NLL to (sum, count). Done row by row so that only one row of
/// f32 logits [T, V] is materialised at a time.
fn add_batch_loss(logits: &Tensor, batch: &Batch, sum: &mut f64, count: &mut usize) -> Result<()> {
    for (b, &len) in batch.lengths.iter().enumerate() {
        if len < 2 {
            continue;
        }
        let b = b as i64;
        let n = len as i64 - 1;
        let row_logits = logits.f_get(b)?.f_narrow(0, 0, n)?.f_to_kind(Kind::Float)?;
        let targets = batch.ids.f_get(b)?.f_narrow(0, 1, n)?;
        let nll = row_logits.f_cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Sum, -100, 0.0)?;
        *sum += nll.f_double_value(&[])?;
        *count += n as usize;
    }
    Ok(())
}

/// Run the model over `batches` recording importances and the calibration loss.
/// `progress(tokens)` is called after each batch.
pub fn calibrate(
    model: &Transformer,
    batches: &[Vec<Vec<u32>>],
    seq_agg: SeqAgg,
    norm: SampleNorm,
    progress: &mut dyn FnMut(usize),
) -> Result<(Importance, LossStats)> {
    let config = &model.config;
    check_token_ids(batches, config.vocab_size)?;
    let device = model.device();
    let mut acc = ImportanceAccumulator::new(config, seq_agg, norm, device);
    let (mut loss_sum, mut loss_count) = (0.0, 0usize);
    let _guard = tch::no_grad_guard();
    for (i, rows) in batches.iter().enumerate() {
        let batch = Batch::from_rows(rows, device).with_context(|| format!("calibration batch {i}"))?;
        acc.begin_batch(&batch.attention_mask)?;
        let logits = model
            .forward_with_taps(&batch.ids, &batch.positions, &batch.attention_mask, &mut |layer, point, x| {
                acc.observe(layer, point, x)
            })
            .with_context(|| format!("forward pass of calibration batch {i}"))?;
        acc.end_batch().with_context(|| format!("calibration batch {i}"))?;
        add_batch_loss(&logits, &batch, &mut loss_sum, &mut loss_count)?;
        progress(batch.tokens());
    }
    let (hidden, intermediate) = acc.finish()?;
    let importance = Importance {
        hidden,
        intermediate,
        calib_size: acc.samples,
        tokens: acc.tokens,
        seq_agg,
        norm,
        model_hash: config_hash(config),
        model_config: config.to_hf_json().to_string(),
    };
    Ok((importance, LossStats { loss: loss_sum / loss_count.max(1) as f64, tokens: loss_count }))
}

/// Calibration loss only (e.g. of the pruned model).
pub fn lm_loss(model: &Transformer, batches: &[Vec<Vec<u32>>], progress: &mut dyn FnMut(usize)) -> Result<LossStats> {
    check_token_ids(batches, model.config.vocab_size)?;
    let device = model.device();
    let (mut sum, mut count) = (0.0, 0usize);
    let _guard = tch::no_grad_guard();
    for (i, rows) in batches.iter().enumerate() {
        let batch = Batch::from_rows(rows, device).with_context(|| format!("calibration batch {i}"))?;
        let logits = model
            .forward(&batch.ids, &batch.positions, &batch.attention_mask, None)
            .with_context(|| format!("forward pass of calibration batch {i}"))?;
        add_batch_loss(&logits, &batch, &mut sum, &mut count)?;
        progress(batch.tokens());
    }
    Ok(LossStats { loss: sum / count.max(1) as f64, tokens: count })
}

/// Token ids at or above the model's vocabulary would index past the embedding table.
pub fn check_token_ids(batches: &[Vec<Vec<u32>>], vocab_size: usize) -> Result<()> {
    for (b, rows) in batches.iter().enumerate() {
        for (r, row) in rows.iter().enumerate() {
            if let Some(&id) = row.iter().find(|&&id| id as usize >= vocab_size) {
                bail!(
                    "calibration batch {b} row {r} has token id {id}, but the model's vocabulary has {vocab_size} entries (data tokenized with another tokenizer?)"
                );
            }
        }
    }
    Ok(())
}
