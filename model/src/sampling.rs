//! Choosing the next token from a step's logits: greedy, or sampling with temperature, top-k
//! and top-p (nucleus), in that order (transformers' logits warpers apply them in the same order).
//!
//! Sampling draws from its own generator (SplitMix64 seeded by `seed`), not from libtorch's
//! global one, so a seeded run is reproducible whatever else the process does with torch's RNG.
//! The draw is an inverse-CDF lookup on the device: one uniform number per row goes host→device,
//! the chosen ids are the only thing that comes back.
//!
//! Shapes: B rows, V vocabulary.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// argmax of the logits.
    Greedy,
    /// Draw from softmax(logits / temperature), restricted to the `top_k` most likely tokens
    /// and then to the smallest set whose probability reaches `top_p`.
    Sample {
        temperature: f64,
        /// `None` = no limit.
        top_k: Option<usize>,
        /// 1.0 = no limit.
        top_p: f64,
        seed: u64,
    },
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::Greedy
    }
}

impl Sampling {
    /// From command-line style settings: temperature 0 means greedy.
    pub fn new(temperature: f64, top_k: Option<usize>, top_p: f64, seed: u64) -> Result<Self> {
        if !temperature.is_finite() || temperature < 0.0 {
            bail!("temperature must be a finite number >= 0, got {temperature}");
        }
        if top_k == Some(0) {
            bail!("top-k must be at least 1");
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            bail!("top-p must be in (0, 1], got {top_p}");
        }
        if temperature == 0.0 {
            return Ok(Sampling::Greedy);
        }
        Ok(Sampling::Sample {
            temperature,
            top_k,
            top_p,
            seed,
        })
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014; the seeding generator of java.util.SplittableRandom and
/// of the xoshiro family): a 64-bit state, good enough for drawing one uniform per row and step.
#[derive(Debug, Clone)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Chooses tokens step after step; holds the generator of a sampling run.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        let seed = match &sampling {
            Sampling::Sample { seed, .. } => *seed,
            Sampling::Greedy => 0,
        };
        Sampler {
            sampling,
            rng: SplitMix64 { state: seed },
        }
    }

    pub fn sampling(&self) -> &Sampling {
        &self.sampling
    }

    /// logits [B, V] (any float kind, on any device) -> chosen ids [B] i64 on the same device.
    pub fn choose(&mut self, logits: &Tensor) -> Tensor {
        let (temperature, top_k, top_p) = match &self.sampling {
            Sampling::Greedy => return logits.argmax(-1, false),
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } => (*temperature, *top_k, *top_p),
        };
        let (rows, vocab) = (logits.size()[0], logits.size()[1]);
        let device = logits.device();
        let mut scores = logits.to_kind(Kind::Float) / temperature;
        if let Some(k) = top_k {
            let k = (k as i64).min(vocab);
            // The k-th largest score per row [B, 1]; ties with it stay in.
            let (values, _) = scores.topk(k, -1, true, true);
            let kth = values.narrow(-1, k - 1, 1);
            scores = scores.masked_fill(&scores.lt_tensor(&kth), f64::NEG_INFINITY);
        }
        let probs = scores.softmax(-1, Kind::Float);
        // One uniform per row: u * total mass is the point of the CDF to look up.
        let uniforms: Vec<f32> = (0..rows).map(|_| self.rng.next_f64() as f32).collect();
        let uniforms = Tensor::from_slice(&uniforms)
            .view([rows, 1])
            .to_device(device);
        if top_p < 1.0 {
            let (sorted, order) = probs.sort(-1, true);
            let cumulative = sorted.cumsum(-1, Kind::Float);
            // Keep a token while the mass before it is below top_p (the most likely always stays).
            let before = &cumulative - &sorted;
            let kept = sorted.masked_fill(&before.ge(top_p), 0.0);
            let picked = inverse_cdf(&kept, &uniforms); // [B, 1] index into the sorted order
            order.gather(-1, &picked, false).squeeze_dim(-1)
        } else {
            inverse_cdf(&probs, &uniforms).squeeze_dim(-1)
        }
    }
}

/// weights [B, V] >= 0 (not necessarily normalised), uniforms [B, 1] in [0, 1) -> [B, 1] i64:
/// the first index whose cumulative weight exceeds u * total (never a zero-weight index).
fn inverse_cdf(weights: &Tensor, uniforms: &Tensor) -> Tensor {
    let vocab = weights.size()[1];
    let cumulative = weights.cumsum(-1, Kind::Float);
    let total = cumulative.narrow(-1, vocab - 1, 1);
    let point = uniforms * total;
    cumulative
        .le_tensor(&point)
        .sum_dim_intlist(-1, true, Kind::Int64)
        .clamp_max(vocab - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn logits() -> Tensor {
        Tensor::from_slice(&[0.1f32, 2.0, -1.0, 1.5, 0.0, 3.0, 0.2, -0.5]).view([2, 4])
    }

    #[test]
    fn greedy_is_argmax() {
        let ids = Sampler::new(Sampling::Greedy).choose(&logits());
        assert_eq!(Vec::<i64>::try_from(ids).unwrap(), vec![1, 1]);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let mut sampler = Sampler::new(Sampling::new(1.5, Some(1), 1.0, 7).unwrap());
        for _ in 0..20 {
            let ids = sampler.choose(&logits());
            assert_eq!(Vec::<i64>::try_from(ids).unwrap(), vec![1, 1]);
        }
        let draw = |seed| {
            let mut s = Sampler::new(Sampling::new(1.0, None, 1.0, seed).unwrap());
            (0..50)
                .flat_map(|_| Vec::<i64>::try_from(s.choose(&logits())).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // Row probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two tokens.
        let probs = Tensor::from_slice(&[0.15f32, 0.5, 0.05, 0.3]).view([1, 4]);
        let mut sampler = Sampler::new(Sampling::new(1.0, None, 0.7, 11).unwrap());
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let id = sampler.choose(&probs.log()).int64_value(&[0]);
            seen.insert(id);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn inverse_cdf_skips_zero_weights() {
        let w = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 0.0]).view([1, 4]);
        for u in [0.0f32, 0.5, 0.999] {
            let u = Tensor::from_slice(&[u]).view([1, 1]).to_device(Device::Cpu);
            assert_eq!(inverse_cdf(&w, &u).int64_value(&[0, 0]), 2);
        }
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(Sampling::new(-1.0, None, 1.0, 0).is_err());
        assert!(Sampling::new(1.0, Some(0), 1.0, 0).is_err());
        assert!(Sampling::new(1.0, None, 0.0, 0).is_err());
        assert_eq!(
            Sampling::new(0.0, Some(5), 0.9, 0).unwrap(),
            Sampling::Greedy
        );
    }
}
