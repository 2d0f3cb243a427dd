//! The plan's checks: every key's errors name the file or flag, the key and the value.

use super::*;
use crate::experiment::{Conditional, DatasetKind, Precision};
use crate::model::{GatedConfig, Likelihood};

fn synthetic() -> Experiment {
    let mut e = Experiment::default();
    e.data.dataset = DatasetKind::Synthetic;
    e
}

fn plan(e: Experiment) -> Result<Plan> {
    Plan::new(e, vec![], Path::new("experiments/x.toml"), None)
}

fn err(e: Experiment) -> String {
    plan(e).unwrap_err().to_string()
}

/// PixelCNN++: its defaults (the logistic mixture, openai's sizes), its table, and the keys
/// that mean nothing to it or to the other variants.
#[test]
fn pixelcnnpp_keys_and_likelihoods() {
    use crate::experiment::{LikelihoodKind, PixelCnnPpSection};
    let mut e = synthetic();
    e.model.variant = Variant::Pixelcnnpp;
    e.model.channels = 16;
    e.data.synthetic_colours = 3;
    let p = plan(e.clone()).unwrap();
    let ModelConfig::PixelCnnPp(c) = &p.model else {
        panic!("{:?}", p.model)
    };
    assert_eq!(
        (c.filters, c.resnets, c.dropout, c.likelihood),
        (16, 5, 0.5, Likelihood::LogisticMixture { components: 10 })
    );
    // The resolved experiment says which likelihood was chosen.
    assert!(
        p.resolved_toml()
            .contains("likelihood = \"logistic_mixture\""),
        "{}",
        p.resolved_toml()
    );
    assert!(p.resolved_toml().contains("[model.pixelcnnpp]"));
    // 16 filters need not be a multiple of the 3 colours.
    let mut k = e.clone();
    k.model.kernel = 3;
    assert!(err(k).contains("`model.kernel` = 3"));
    let mut l = e.clone();
    l.model.layers = 8;
    assert!(err(l).contains("model.pixelcnnpp.resnets"));
    let mut d = e.clone();
    d.model.pixelcnnpp.dropout = 1.0;
    assert!(err(d).contains("`model.pixelcnnpp.dropout` = 1"));
    let mut r = e.clone();
    r.model.pixelcnnpp.resnets = 0;
    assert!(err(r).contains("`model.pixelcnnpp.resnets` = 0"));
    let mut g = e.clone();
    g.model.gates = false;
    assert!(err(g).contains("`model.gates` = false"));
    // Categorical: 256 logits per colour; then mixtures means nothing.
    let mut cat = e.clone();
    cat.model.likelihood = Some(LikelihoodKind::Categorical);
    assert_eq!(
        plan(cat.clone()).unwrap().model.likelihood(),
        Likelihood::Categorical
    );
    cat.model.mixtures = 5;
    assert!(err(cat).contains("`model.mixtures` = 5"));
    // The other variants: categorical by default; a mixture on grey images only.
    let mut gated = synthetic();
    gated.model.variant = Variant::Gated;
    assert_eq!(
        plan(gated.clone()).unwrap().model.likelihood(),
        Likelihood::Categorical
    );
    gated.model.likelihood = Some(LikelihoodKind::LogisticMixture);
    gated.model.mixtures = 4;
    assert_eq!(
        plan(gated.clone()).unwrap().model.likelihood(),
        Likelihood::LogisticMixture { components: 4 }
    );
    gated.data.synthetic_colours = 3;
    gated.model.channels = 30;
    let msg = err(gated.clone());
    assert!(
        msg.contains("`model.likelihood`") && msg.contains("pixelcnnpp"),
        "{msg}"
    );
    gated.data.synthetic_colours = 1;
    gated.model.mixtures = 0;
    assert!(err(gated.clone()).contains("`model.mixtures` = 0"));
    gated.model.mixtures = 4;
    gated.model.pixelcnnpp = PixelCnnPpSection {
        resnets: 2,
        ..PixelCnnPpSection::default()
    };
    assert!(err(gated.clone()).contains("no [model.pixelcnnpp] table"));
    gated.model.pixelcnnpp = PixelCnnPpSection::default();
    assert!(
        !plan(gated)
            .unwrap()
            .resolved_toml()
            .contains("[model.pixelcnnpp]")
    );
}

#[test]
fn valid_synthetic_plan() {
    let p = plan(synthetic()).unwrap();
    assert_eq!(p.name, "x");
    assert_eq!(p.model.colours(), 1);
}

#[test]
fn out_of_range_values_name_file_key_and_value() {
    let mut e = synthetic();
    e.model.kernel = 4;
    let msg = err(e);
    assert!(msg.contains("experiments/x.toml"), "{msg}");
    assert!(msg.contains("`model.kernel` = 4"), "{msg}");
    assert!(msg.contains("odd"), "{msg}");

    let mut e = synthetic();
    e.data.synthetic_colours = 3;
    e.model.channels = 31;
    assert!(err(e).contains("`model.channels` = 31"));

    let mut e = synthetic();
    e.model.layers = 0;
    assert!(err(e).contains("`model.layers` = 0"));

    let mut e = synthetic();
    e.train.batch_size = 0;
    assert!(err(e).contains("`train.batch_size` = 0"));

    let mut e = synthetic();
    e.train.learning_rate = -0.1;
    assert!(err(e).contains("`train.learning_rate` = -0.1"));

    let mut e = synthetic();
    e.sample.grid = 5;
    assert!(err(e).contains("`sample.grid` = 5"));

    let mut e = synthetic();
    e.train.lr_decay = 0.0;
    assert!(err(e).contains("`train.lr_decay` = 0"));
    let mut e = synthetic();
    e.train.lr_decay = 1.5;
    assert!(err(e).contains("`train.lr_decay` = 1.5"));
    let mut e = synthetic();
    e.train.adam_betas = [0.9, 1.0];
    assert!(err(e).contains("`train.adam_betas[1]` = 1"));
    let mut e = synthetic();
    e.train.clip_grad_norm = -1.0;
    assert!(err(e).contains("`train.clip_grad_norm` = -1"));
    let mut e = synthetic();
    e.train.ema = 1.0;
    assert!(err(e).contains("`train.ema` = 1: expected a decay in [0, 1)"));

    let mut e = synthetic();
    e.runtime.device = "gpu".into();
    assert!(err(e).contains("`runtime.device` = \"gpu\""));
}

/// Sizes that cannot fit are refused from the config alone, with the estimate; the key
/// `runtime.allow_large` lets them through knowingly. (Assumes a machine with less than
/// 1000 TiB of memory.)
#[test]
fn sizes_that_cannot_fit_are_refused_before_anything_is_built() {
    let mut e = synthetic();
    e.model.channels = 1_000_000_000;
    let msg = err(e.clone());
    assert!(msg.contains("channels = 1000000000"), "{msg}");
    assert!(msg.contains("parameters") && msg.contains("GiB"), "{msg}");
    e.runtime.allow_large = true;
    assert!(plan(e).is_ok());
    // The default model at the default batch fits anywhere this runs.
    assert!(plan(synthetic()).is_ok());
}

#[test]
fn class_conditioning_needs_the_gated_variant() {
    let mut e = synthetic();
    e.model.conditional = Conditional::Class;
    assert!(err(e.clone()).contains("`model.conditional`"));
    e.model.variant = Variant::Gated;
    let p = plan(e).unwrap();
    assert!(matches!(
        p.model,
        ModelConfig::Gated(GatedConfig {
            classes: Some(10),
            ..
        })
    ));
}

#[test]
fn override_is_named_as_the_source() {
    let mut e = synthetic();
    e.train.epochs = 0;
    let o = Override {
        key: "train.epochs".into(),
        value: "0".into(),
        origin: "--set".into(),
    };
    let msg = Plan::new(e, vec![o], Path::new("a.toml"), None)
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("--set (overriding a.toml)"), "{msg}");
}

#[test]
fn missing_dataset_without_download_says_what_to_put_where() {
    let mut e = Experiment::default();
    e.data.download = false;
    e.data.path = Some("no/such/folder".into());
    let msg = err(e);
    assert!(msg.contains("no/such/folder"), "{msg}");
    assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
}

/// `auto` plans everywhere, but CUDA needs libtorch compiled in.
#[cfg(not(feature = "tch"))]
#[test]
fn auto_backend_needs_libtorch_only_for_cuda() {
    let mut e = synthetic();
    e.runtime.backend = crate::experiment::BackendKind::Auto;
    assert!(plan(e.clone()).is_ok());
    e.runtime.device = "cuda:1".into();
    let msg = err(e);
    assert!(msg.contains("`runtime.device` = \"cuda:1\""), "{msg}");
    assert!(msg.contains("--features tch"), "{msg}");
}

#[cfg(not(feature = "tch"))]
#[test]
fn backend_not_compiled_in_says_how_to_rebuild() {
    let mut e = synthetic();
    e.runtime.backend = crate::experiment::BackendKind::Libtorch;
    let msg = err(e);
    assert!(msg.contains("--features tch"), "{msg}");
}

/// A CUDA graph is refused where the run cannot be on CUDA and in a build without graphs;
/// libtorch on "auto" or "cuda" plans it in every precision.
#[test]
fn cuda_graph_only_where_a_graph_can_run() {
    let mut e = synthetic();
    e.runtime.cuda_graph = true;
    let msg = err(e.clone());
    assert!(msg.contains("`runtime.cuda_graph` = true"), "{msg}");
    assert!(msg.contains("cannot be on CUDA"), "{msg}");
    if cfg!(feature = "tch") {
        e.runtime.backend = crate::experiment::BackendKind::Libtorch;
        for precision in [Precision::F32, Precision::Bf16, Precision::F16] {
            e.runtime.precision = precision;
            match crate::model::native::graph::available() {
                true => assert!(plan(e.clone()).is_ok()),
                false => assert!(err(e.clone()).contains("no CUDA graphs"), "{precision:?}"),
            }
        }
        e.runtime.precision = Precision::F32;
        e.runtime.device = "cpu".into();
        assert!(err(e).contains("cannot be on CUDA"));
    }
}

/// cuDNN's benchmarking is refused where the run cannot be on CUDA (flex, or device "cpu") and
/// beside `runtime.deterministic`; libtorch with device "auto" or "cuda" plans it.
#[test]
fn cudnn_benchmark_only_where_cudnn_can_run_and_not_with_determinism() {
    let mut e = synthetic();
    e.runtime.cudnn_benchmark = true;
    let msg = err(e.clone());
    assert!(msg.contains("`runtime.cudnn_benchmark` = true"), "{msg}");
    assert!(msg.contains("cannot be on CUDA"), "{msg}");
    if cfg!(feature = "tch") {
        e.runtime.backend = crate::experiment::BackendKind::Libtorch;
        assert!(plan(e.clone()).is_ok());
        e.runtime.device = "cpu".into();
        assert!(err(e.clone()).contains("cannot be on CUDA"));
        e.runtime.device = "auto".into();
        e.runtime.deterministic = true;
        let msg = err(e);
        assert!(msg.contains("with runtime.deterministic = true"), "{msg}");
    }
}
