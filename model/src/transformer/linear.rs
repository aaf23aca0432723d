//! The two parameterised building blocks of every layer: a linear map (optional bias) and
//! RMSNorm.
use tch::{Kind, Tensor};

/// y = x Wᵀ (+ b), over any leading dimensions.
#[derive(Debug)]
pub(super) struct Linear {
    /// [out, in]
    pub(super) weight: Tensor,
    /// [out]
    pub(super) bias: Option<Tensor>,
}

impl Linear {
    /// x [.., in] -> [.., out]
    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

#[derive(Debug)]
pub(super) struct RmsNorm {
    /// [D]
    pub(super) weight: Tensor,
    pub(super) eps: f64,
}

impl RmsNorm {
    /// x [.., D]: x * rsqrt(mean(x²) + eps) computed in f32, cast back, then scaled
    /// (transformers' order).
    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.square().mean_dim(-1, true, Kind::Float);
        let normed = (x32 * (variance + self.eps).rsqrt()).to_kind(kind);
        &self.weight * normed
    }
}
