//! Records the git revision for `run.json`. For libtorch builds it compiles
//! `src/native/torch_extras.cpp` (the CUDA allocator's peak, the determinism switches and a
//! backward pass from a given gradient, which tch does not expose) against the
//! headers of the libtorch that torch-sys links, and, where that is the Python package's libtorch
//! (`LIBTORCH_USE_PYTORCH=1`), adds its library folder to the binary's rpath so that `pixel` runs
//! without `LD_LIBRARY_PATH`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let revision = Command::new("git")
        .args(["describe", "--always", "--dirty", "--exclude", "*"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BUILD_GIT_REVISION={revision}");

    if std::env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    #[cfg(feature = "tch")]
    compile_torch_extras();
    let lib = if let Some(root) = std::env::var_os("LIBTORCH") {
        Some(std::path::PathBuf::from(root).join("lib"))
    } else if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
            .args([
                "-c",
                "import torch, os; print(os.path.dirname(torch.__file__))",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("lib")
            })
    } else {
        None
    };
    if let Some(lib) = lib {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}

/// The same value of `_GLIBCXX_USE_CXX11_ABI` as torch-sys compiles its own C++ with: the Python
/// package's where it is used, else `LIBTORCH_CXX11_ABI`, else 1.
#[cfg(feature = "tch")]
fn cxx11_abi() -> String {
    if let Ok(abi) = std::env::var("LIBTORCH_CXX11_ABI") {
        return abi;
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let out = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
            .args([
                "-c",
                "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
            ])
            .output()
            .expect("python3 runs (LIBTORCH_USE_PYTORCH is set)");
        return String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    "1".into()
}

/// Compiles what tch does not expose of libtorch against its headers (beside the library folder
/// torch-sys reports, or under `LIBTORCH_INCLUDE`) and links it with c10.
#[cfg(feature = "tch")]
fn compile_torch_extras() {
    println!("cargo:rerun-if-changed=src/native/torch_extras.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let root = match std::env::var_os("LIBTORCH_INCLUDE") {
        Some(include) => std::path::PathBuf::from(include),
        None => {
            let lib = std::env::var_os("DEP_TCH_LIBTORCH_LIB")
                .expect("torch-sys reports its libtorch (DEP_TCH_LIBTORCH_LIB)");
            std::path::PathBuf::from(lib).join("..")
        }
    };
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        // As libtorch is built: some of its classes (at::RecordFunction) have members only
        // without NDEBUG, so code compiled without it reads them at the wrong places.
        .define("NDEBUG", None)
        .file("src/native/torch_extras.cpp");
    // An older or newer libtorch whose allocator or profiler interface differs: build without
    // what does not compile, and say so (`pixel bench` then says it on CUDA and when asked to
    // profile too).
    let mut first_error = None;
    for missing in [
        &[][..],
        &["ALLOCATOR_STATS"],
        &["PROFILER"],
        &["ALLOCATOR_STATS", "PROFILER"],
    ] {
        let mut attempt = build.clone();
        for m in missing {
            attempt.define(&format!("PIXEL_NO_{m}"), None);
        }
        match attempt.try_compile("pixel_torch_extras") {
            Ok(()) => {
                if let Some(e) = first_error {
                    let lacks = missing.join(" and ").to_lowercase().replace('_', " ");
                    println!(
                        "cargo:warning=no {lacks} in this build: src/native/torch_extras.cpp does \
                         not compile against {} ({e})",
                        root.display()
                    );
                }
                println!("cargo:rustc-link-lib=c10");
                return;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    panic!(
        "src/native/torch_extras.cpp does not compile against {}: {}",
        root.display(),
        first_error.expect("tried")
    );
}
