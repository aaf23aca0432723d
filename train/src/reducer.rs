//! What data parallelism plugs in between backward and the optimizer step, as the trainer, the
//! optimizers and the validation loss see it: `dist::Dist` implements it over c10d.
use anyhow::Result;
use tch::Tensor;

/// What data parallelism plugs in between backward and the optimizer step. At world size 1
/// every reduction is the identity.
pub trait GradientReducer {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums every rank's gradients in place (each micro-batch's loss is already divided by the
    /// global token count, so the sum is the gradient of the global token mean).
    fn all_reduce_gradients(&self, gradients: &mut [Tensor]) -> Result<()>;
    /// Sums host-side metrics (loss sums, token counts) over ranks in place.
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()>;
    /// Copies rank 0's tensors into every rank's (the decoder's weights at start).
    fn broadcast_from_rank0(&self, _tensors: &[Tensor]) -> Result<()> {
        Ok(())
    }
    /// `output` = this rank's slice of the sum over ranks of `input` (ZeRO-1's gradients).
    fn reduce_scatter_sum(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        tch::no_grad(|| output.view([-1]).copy_(&input.view([-1])));
        Ok(())
    }
    /// `output` = every rank's `input`, end to end in rank order (ZeRO-1's parameters).
    fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        tch::no_grad(|| output.view([-1]).copy_(&input.view([-1])));
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// One process, no communication. (`overfill train` passes a `Dist`, which is this at world
/// size 1.)
pub struct SingleProcess;

impl GradientReducer for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_gradients(&self, _gradients: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
}
