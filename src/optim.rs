//! The optimiser, configured as PyTorch's defaults (the seed's code uses `torch.optim.Adam`).

use burn::optim::{AdamConfig, ModuleOptimizer};

/// Adam with beta = (0.9, 0.999) and PyTorch's epsilon of 1e-8 (Burn's default is 1e-5).
pub fn adam() -> ModuleOptimizer {
    AdamConfig::new().with_epsilon(1e-8).init()
}
