//! A model's weights as a safetensors file (through burn-store's `SafetensorsStore`), named as
//! the PyTorch twins in `bench/` name their parameters: the module path of each parameter below
//! the network (`layers.0.vertical.weight`, `up_u.3.conv1.bias`), every tensor in its Burn layout,
//! which is PyTorch's for every parameter pixel has (convolutions `[out, in, kh, kw]`, transposed
//! ones `[in, out, kh, kw]`, 1x1 "network in network" weights `[out, in]` as `nn.Linear`). Masks
//! are rebuilt by whoever builds the network and are not written.

use super::{Model, ModelConfig};
use burn_store::{ModuleSnapshot, SafetensorsStore};

/// The file's bytes: every trained parameter of `model`, f32, and `metadata` besides Burn's own
/// (`format`, `producer`, `version`).
pub fn safetensors(model: &Model, metadata: &[(&str, String)]) -> Result<Vec<u8>, String> {
    let mut store = SafetensorsStore::from_bytes(None)
        .skip_enum_variants(true)
        // Below the network: `Model.net` is the path's first step, and the enum's variant is
        // skipped above.
        .with_key_remapping(r"^net\.", "");
    for (key, value) in metadata {
        store = store.metadata(*key, value.clone());
    }
    model
        .save_into(&mut store)
        .map_err(|e| format!("collecting the weights: {e}"))?;
    store
        .get_bytes()
        .map_err(|e| format!("writing safetensors: {e}"))
}

impl ModelConfig {
    /// The architecture as the twins read it from an exported file's `pixel.model` metadata.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a model config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GatedConfig, Likelihood, PixelCnnPpConfig};
    use burn::tensor::Device;
    use safetensors::SafeTensors;

    fn written(config: ModelConfig) -> (Vec<String>, usize) {
        let model = config.init(1, &Device::flex());
        let bytes = safetensors(&model, &[("pixel.model", config.to_json())]).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = file.names().into_iter().map(|n| n.to_string()).collect();
        names.sort();
        let scalars = file
            .tensors()
            .iter()
            .map(|(_, t)| t.shape().iter().product::<usize>())
            .sum();
        (names, scalars)
    }

    #[test]
    fn every_parameter_is_written_once_under_its_module_path() {
        let mut gated = GatedConfig::plain(1, 2, 3, 4);
        gated.classes = Some(10);
        let config = ModelConfig::Gated(gated);
        let params = config.init(1, &Device::flex()).parameters();
        let (names, scalars) = written(config);
        assert_eq!(
            scalars, params,
            "every trained scalar, and nothing else (no masks)"
        );
        for name in [
            "layers.0.vertical.weight",
            "layers.0.horizontal.bias",
            "layers.1.link.weight",
            "layers.1.class_v",
            "head_out.weight",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
        let pp = PixelCnnPpConfig {
            colours: 3,
            filters: 4,
            resnets: 1,
            likelihood: Likelihood::LogisticMixture { components: 2 },
            classes: Some(3),
            dropout: 0.5,
        };
        let (names, scalars) = written(ModelConfig::PixelCnnPp(pp));
        assert_eq!(scalars, pp.parameters() as usize);
        for name in [
            "up_ul.0.aux.weight",
            "down_u.4.class",
            "double_ul.1.weight",
            "out.bias",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
    }
}
