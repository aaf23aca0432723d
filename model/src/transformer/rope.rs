//! Rotary position embedding (RoPE): the inverse frequencies (with Llama 3's smoothing when
//! configured), the cos/sin tables of a span's positions, and the rotation itself. Tables in f32,
//! as transformers computes them, then cast to the model's kind.
use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, RopeScaling};

/// Inverse frequencies [hd/2] (f32).
pub(super) fn inv_freq(config: &ModelConfig, device: Device) -> Tensor {
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

/// cos and sin tables [B, 1, T, hd] in `kind` for positions [B, T].
pub(super) fn tables(inv_freq: &Tensor, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
    // [B, T, 1] * [hd/2] -> [B, T, hd/2]
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
    let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

/// x * cos + rotate_half(x) * sin, x [B, heads, T, hd]; cos/sin [B, 1, T, hd] are cast to x's
/// kind first (under autocast q/k come out of the projections in the autocast kind, not the
/// model's; a no-op when the kinds agree, as in inference).
pub(super) fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (cos, sin) = if cos.kind() == x.kind() {
        (cos.shallow_clone(), sin.shallow_clone())
    } else {
        (cos.to_kind(x.kind()), sin.to_kind(x.kind()))
    };
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], 3);
    x * cos + rotated * sin
}
