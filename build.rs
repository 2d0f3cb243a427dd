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

/// The folders of the CUDA runtime's headers (`cuda_runtime_api.h`, and the `crt/` headers it
/// includes) for a libtorch built with CUDA (`libtorch_cuda.so` beside it): `CUDA_HOME`'s, else
/// NVIDIA's wheels beside the Python package's libtorch (`LIBTORCH_USE_PYTORCH=1`: the runtime's
/// `nvidia/cuda_runtime` and nvcc's `nvidia/cuda_nvcc` for CUDA 12, `nvidia/cu13` for 13, whose
/// `crt/` comes with `nvidia-cuda-crt`), else /usr/local/cuda's. None where a header is missing.
#[cfg(feature = "tch")]
fn cuda_include(root: &std::path::Path) -> Option<Vec<std::path::PathBuf>> {
    use std::path::PathBuf;
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if !root.join("lib/libtorch_cuda.so").exists() {
        return None;
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("include"));
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        // torch/ and nvidia/ are siblings in site-packages.
        let nvidia = root.join("../nvidia");
        for sub in ["cuda_runtime", "cuda_nvcc", "cu13", "cu12"] {
            candidates.push(nvidia.join(sub).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    let find = |header: &str| candidates.iter().find(|d| d.join(header).exists()).cloned();
    let runtime = find("cuda_runtime_api.h")?;
    let crt = find("crt/host_defines.h")?;
    Some(if runtime == crt {
        vec![runtime]
    } else {
        vec![runtime, crt]
    })
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
    // CUDA graphs need the CUDA runtime's headers, which a libtorch with CUDA does not ship.
    let cuda = cuda_include(&root);
    for include in cuda.iter().flatten() {
        build.include(include);
    }
    // An older or newer libtorch whose allocator or profiler interface differs: build without
    // what does not compile, and say so (`pixel bench` then says it on CUDA and when asked to
    // profile too; a run asking for CUDA graphs is refused).
    let mut first_error = None;
    let graphs: &[bool] = if cuda.is_some() {
        &[true, false]
    } else {
        &[false]
    };
    for &graph in graphs {
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
            if !graph {
                attempt.define("PIXEL_NO_CUDA_GRAPH", None);
            }
            match attempt.try_compile("pixel_torch_extras") {
                Ok(()) => {
                    let mut lacks: Vec<String> = missing
                        .iter()
                        .map(|m| m.to_lowercase().replace('_', " "))
                        .collect();
                    if !graph {
                        lacks.push("CUDA graphs".into());
                    }
                    if let Some(e) = first_error.filter(|_| !lacks.is_empty()) {
                        println!(
                            "cargo:warning=no {} in this build: src/native/torch_extras.cpp does \
                             not compile against {} ({e})",
                            lacks.join(" and "),
                            root.display()
                        );
                    } else if !graph && root.join("lib/libtorch_cuda.so").exists() {
                        println!(
                            "cargo:warning=no CUDA graphs in this build: no CUDA runtime headers \
                             (cuda_runtime_api.h and crt/host_defines.h) found for the libtorch \
                             at {} (set CUDA_HOME, or install NVIDIA's nvcc or crt wheel beside \
                             its PyTorch, as bench/cuda-headers.sh does)",
                            root.display()
                        );
                    }
                    println!("cargo:rustc-link-lib=c10");
                    if graph {
                        println!("cargo:rustc-link-lib=c10_cuda");
                        println!("cargo:rustc-link-lib=torch_cuda");
                    }
                    return;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    panic!(
        "src/native/torch_extras.cpp does not compile against {}: {}",
        root.display(),
        first_error.expect("tried")
    );
}
