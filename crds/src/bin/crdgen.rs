//! Writes the CRDs generated from the Rust types into the chart.
//!
//! `crdgen` writes `charts/wgpin/crds/*.yaml` (run from the repository root, or pass the
//! directory) and, from the repository root, the API access lists the chart's RBAC is checked
//! against (`charts/wgpin/tests/access.json`); `crdgen --check` only compares and exits 1 when
//! the files differ.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use wgpin_crds::{access, crd};

fn main() -> ExitCode {
    let mut check = false;
    let mut dir = PathBuf::from(crd::CHART_CRD_DIR);
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!(
                    "usage: crdgen [--check] [DIR]   (DIR defaults to {})",
                    crd::CHART_CRD_DIR
                );
                return ExitCode::SUCCESS;
            }
            other if other.starts_with('-') => {
                eprintln!("crdgen: unknown option {other}; usage: crdgen [--check] [DIR]");
                return ExitCode::from(2);
            }
            other => dir = PathBuf::from(other),
        }
    }
    match run(&dir, check) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("crdgen: {message}");
            ExitCode::from(2)
        }
    }
}

/// Returns whether the directory holds exactly the generated files (after writing, unless
/// `check`).
fn run(dir: &Path, check: bool) -> Result<bool, String> {
    let mut files: Vec<(PathBuf, String)> = crd::generated_files()
        .map_err(|e| format!("cannot serialize the CRDs: {e}"))?
        .into_iter()
        .map(|(name, contents)| (dir.join(name), contents))
        .collect();
    let access = Path::new(access::CHART_ACCESS_FILE);
    if access.parent().is_some_and(Path::is_dir) {
        files.push((
            access.to_path_buf(),
            access::generated_file()
                .map_err(|e| format!("cannot serialize the access lists: {e}"))?,
        ));
    }
    if !dir.is_dir() {
        return Err(format!(
            "{} is not a directory; run crdgen from the repository root or pass the chart's crds directory",
            dir.display()
        ));
    }
    let mut up_to_date = true;
    for (path, contents) in files {
        let current = std::fs::read_to_string(&path).ok();
        if current.as_deref() == Some(contents.as_str()) {
            continue;
        }
        up_to_date = false;
        if check {
            eprintln!(
                "crdgen: {} differs from the Rust types; run `cargo run -p wgpin-crds --bin crdgen` and commit it",
                path.display()
            );
        } else {
            std::fs::write(&path, contents)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(!check || up_to_date)
}
