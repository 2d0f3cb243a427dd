//! The experiment parser: any text must give an experiment and a plan, or an error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pixel_models::experiment::{Plan, parse};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    if let Ok((experiment, overrides)) = parse(text, path, &[]) {
        if let Ok(plan) = Plan::new(experiment, overrides, path, None) {
            // The resolved experiment must parse back to the same values.
            let (again, _) = parse(&plan.resolved_toml(), path, &[]).expect("resolved TOML parses");
            assert_eq!(again, plan.experiment);
        }
    }
});
