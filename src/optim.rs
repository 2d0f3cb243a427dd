//! The optimiser, configured as PyTorch's defaults (the seed's code uses `torch.optim.Adam`).

use burn::optim::{AdamConfig, ModuleOptimizer};

/// Adam with beta = (0.9, 0.999) and PyTorch's epsilon of 1e-8 (Burn's default is 1e-5).
pub fn adam() -> ModuleOptimizer {
    adam_with_betas(0.9, 0.999)
}

/// Adam with these betas and PyTorch's epsilon of 1e-8.
pub fn adam_with_betas(beta1: f64, beta2: f64) -> ModuleOptimizer {
    AdamConfig::new()
        .with_beta_1(beta1 as f32)
        .with_beta_2(beta2 as f32)
        .with_epsilon(1e-8)
        .init()
}
