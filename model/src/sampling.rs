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
use tch::{Device, Kind, Tensor};

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
        let Some((probs, top_p)) = self.before_top_p(logits) else {
            return logits.argmax(-1, false);
        };
        let uniforms = self.uniforms(probs.size()[0], 1, probs.device());
        if top_p < 1.0 {
            let (kept, order) = nucleus(&probs, top_p);
            let picked = inverse_cdf(&kept, &uniforms); // [B, 1] index into the sorted order
            order.gather(-1, &picked, false).squeeze_dim(-1)
        } else {
            inverse_cdf(&probs, &uniforms).squeeze_dim(-1)
        }
    }

    /// The distribution `choose` draws from: logits [B, V] -> probabilities [B, V] f32 (each row
    /// sums to 1) after temperature, top-k and top-p; one-hot at the argmax when greedy.
    /// Speculative sampling compares the drafter's and the verifier's distributions with it.
    pub fn probabilities(&self, logits: &Tensor) -> Tensor {
        let Some((probs, top_p)) = self.before_top_p(logits) else {
            let vocab = logits.size()[1];
            return logits.argmax(-1, false).one_hot(vocab).to_kind(Kind::Float);
        };
        if top_p >= 1.0 {
            return probs;
        }
        let (kept, order) = nucleus(&probs, top_p);
        let kept = kept.zeros_like().scatter(-1, &order, &kept);
        let total = kept.sum_dim_intlist(-1, true, Kind::Float);
        kept / total
    }

    /// One token per row drawn from `weights` [B, V] >= 0 (not necessarily normalised, each row
    /// with some positive weight) -> ids [B] i64, with this sampler's generator.
    pub fn draw(&mut self, weights: &Tensor) -> Tensor {
        let uniforms = self.uniforms(weights.size()[0], 1, weights.device());
        inverse_cdf(weights, &uniforms).squeeze_dim(-1)
    }

    /// [rows, cols] f32 uniforms in [0, 1) from this sampler's generator, on `device`.
    pub fn uniforms(&mut self, rows: i64, cols: i64, device: Device) -> Tensor {
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| self.rng.next_f64() as f32)
            .collect();
        Tensor::from_slice(&values)
            .view([rows, cols])
            .to_device(device)
    }

    /// Sampling: softmax(logits / temperature) restricted to the top-k tokens [B, V] f32, and
    /// the top-p still to apply; `None` when greedy.
    fn before_top_p(&self, logits: &Tensor) -> Option<(Tensor, f64)> {
        let Sampling::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } = &self.sampling
        else {
            return None;
        };
        let vocab = logits.size()[1];
        let mut scores = logits.to_kind(Kind::Float) / *temperature;
        if let Some(k) = top_k {
            let k = (*k as i64).min(vocab);
            // The k-th largest score per row [B, 1]; ties with it stay in.
            let (values, _) = scores.topk(k, -1, true, true);
            let kth = values.narrow(-1, k - 1, 1);
            scores = scores.masked_fill(&scores.lt_tensor(&kth), f64::NEG_INFINITY);
        }
        Some((scores.softmax(-1, Kind::Float), *top_p))
    }
}

/// probs [B, V] -> (the probabilities sorted in descending order with those outside the nucleus
/// zeroed [B, V], the sort order [B, V] i64). A token stays while the mass before it is below
/// top_p (the most likely always stays).
fn nucleus(probs: &Tensor, top_p: f64) -> (Tensor, Tensor) {
    let (sorted, order) = probs.sort(-1, true);
    let cumulative = sorted.cumsum(-1, Kind::Float);
    let before = &cumulative - &sorted;
    (sorted.masked_fill(&before.ge(top_p), 0.0), order)
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
    fn probabilities_are_the_distribution_choose_draws_from() {
        // top-p 0.7 keeps tokens 1 and 3 (0.5 + 0.3), renormalised.
        let probs = Tensor::from_slice(&[0.15f32, 0.5, 0.05, 0.3]).view([1, 4]);
        let nucleus = Sampler::new(Sampling::new(1.0, None, 0.7, 0).unwrap()).probabilities(&probs.log());
        let got = Vec::<f32>::try_from(nucleus.view([-1])).unwrap();
        for (g, want) in got.iter().zip([0.0, 0.625, 0.0, 0.375]) {
            assert!((g - want).abs() < 1e-6, "{got:?}");
        }
        // Temperature 2 and top-k 2 on row 0 of `logits()`: softmax([2.0, 1.5] / 2) at ids 1, 3.
        let warped = Sampler::new(Sampling::new(2.0, Some(2), 1.0, 0).unwrap()).probabilities(&logits());
        let row = Vec::<f32>::try_from(warped.get(0)).unwrap();
        let p1 = 1.0 / (1.0 + (-0.25f32).exp());
        assert!((row[1] - p1).abs() < 1e-6 && (row[3] - (1.0 - p1)).abs() < 1e-6, "{row:?}");
        assert_eq!((row[0], row[2]), (0.0, 0.0));
        let greedy = Sampler::new(Sampling::Greedy).probabilities(&logits());
        assert_eq!(Vec::<f32>::try_from(greedy.view([-1])).unwrap(), [0., 1., 0., 0., 0., 1., 0., 0.]);
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
