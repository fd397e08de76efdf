//! Writes the CRD YAML into `crds/` (what `kubectl apply` takes) and into the Helm chart's
//! `crds/` folder (what `helm install` applies), so the two can never drift apart.
//!
//! `crdgen` writes the files; `crdgen --print` prints them to stdout instead.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let print = std::env::args().any(|a| a == "--print");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let targets = [root.to_path_buf(), root.join("../charts/concentrator/crds")];
    for (stem, crd) in concentrator_crds::all_crds() {
        let yaml = match concentrator_crds::crd_yaml(&crd) {
            Ok(y) => y,
            Err(e) => {
                eprintln!("crdgen: cannot render {stem}: {e}");
                return ExitCode::FAILURE;
            }
        };
        if print {
            print!("---\n{yaml}");
            continue;
        }
        for dir in &targets {
            let path = dir.join(format!("{stem}.yaml"));
            if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &yaml)) {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
        }
    }
    ExitCode::SUCCESS
}
