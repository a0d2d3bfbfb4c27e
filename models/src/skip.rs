//! Tests that cannot run here say why, and fail instead when `KILN_REQUIRE` names their need.
//!
//! A test that needs a Vulkan adapter (`wgpu`), Python with torch (`python`) or the shared data
//! sets (`data`) calls [`skip`] when the need is missing. Without `KILN_REQUIRE` it prints
//! `SKIP: <reason>` and returns true (the test returns early); with `KILN_REQUIRE=wgpu,python,data`
//! (what `.ci/run` sets) it panics with the same reason, so CI cannot lose a test silently.

/// Whether `KILN_REQUIRE` (a comma-separated list) names `need`.
pub fn required(need: &str) -> bool {
    std::env::var("KILN_REQUIRE").is_ok_and(|v| v.split(',').any(|n| n.trim() == need))
}

/// Reports that a test cannot run for `reason` (a missing `need`): true to skip, or a panic when
/// `KILN_REQUIRE` names `need`.
pub fn skip(need: &str, reason: &str) -> bool {
    if required(need) {
        panic!("KILN_REQUIRE={need}, but this test cannot run: {reason}");
    }
    println!("SKIP: {reason}");
    true
}

/// The shared data root (`KILN_DATA`), or a skip that says how to set it (need `data`).
pub fn data_root() -> Option<std::path::PathBuf> {
    match std::env::var_os("KILN_DATA") {
        Some(d) => Some(d.into()),
        None => {
            skip("data", "KILN_DATA is not set (point it at ../shared/data to run this test)");
            None
        }
    }
}

/// The Python to run (`KILN_PYTHON`, else `python3`) if it imports every module of `modules`
/// (comma-separated, as in `import torch, transformers`), else why not.
pub fn python_with(modules: &str) -> Result<String, String> {
    let py = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into());
    match std::process::Command::new(&py).args(["-c", &format!("import {modules}")]).output() {
        Ok(o) if o.status.success() => Ok(py),
        Ok(o) => Err(format!("{py} cannot import {modules} ({})", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""))),
        Err(e) => Err(format!("no {py}: {e}")),
    }
}
