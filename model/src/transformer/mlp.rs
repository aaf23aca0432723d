//! The SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).
use tch::Tensor;

use super::linear::Linear;
use super::{Tap, TapPoint};

#[derive(Debug)]
pub(super) struct Mlp {
    /// [I, D]
    pub(super) gate_proj: Linear,
    /// [I, D]
    pub(super) up_proj: Linear,
    /// [D, I]
    pub(super) down_proj: Linear,
}

impl Mlp {
    /// x [.., D] -> [.., D]; reports the down projection's input [.., I] to `tap`.
    pub(super) fn forward(&self, x: &Tensor, layer: usize, tap: &mut Tap) -> Tensor {
        let hidden = self.gate_proj.forward(x).silu() * self.up_proj.forward(x);
        if let Some(tap) = tap.as_mut() {
            tap(layer, TapPoint::DownProjIn, &hidden);
        }
        self.down_proj.forward(&hidden)
    }
}
