// Records the git commit the binary was built from, for run manifests.
fn main() {
    if let Ok(out) = std::process::Command::new("git").args(["rev-parse", "HEAD"]).output() {
        if out.status.success() {
            let c = String::from_utf8_lossy(&out.stdout).trim().to_string();
            println!("cargo:rustc-env=KILN_GIT_COMMIT={c}");
        }
    }
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
}
