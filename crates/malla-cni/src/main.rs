//! `malla-cni`: the binary a container runtime executes (installed as CNI type `malla`).

use std::collections::BTreeMap;
use std::io::{Read, Write};

fn main() {
    // Run by hand (outside a runtime): say what this is instead of a CNI error.
    if let Some(arg) = std::env::args().nth(1) {
        if matches!(arg.as_str(), "--version" | "-V" | "version") {
            println!("malla-cni {}", env!("CARGO_PKG_VERSION"));
            return;
        }
    }
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
    let command = env.get("CNI_COMMAND").cloned().unwrap_or_default();
    if command != "VERSION" {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            emit_error(&malla_cni::CniError::new(
                malla_cni::error::IO_FAILURE,
                "reading stdin",
                e.to_string(),
            ));
        }
    }
    match malla_cni::run(&env, &stdin) {
        Ok(Some(out)) => {
            let _ = writeln!(std::io::stdout(), "{out}");
        }
        Ok(None) => {}
        Err(e) => emit_error(&e),
    }
}

fn emit_error(e: &malla_cni::CniError) -> ! {
    let _ = writeln!(std::io::stdout(), "{}", e.to_json());
    let _ = writeln!(std::io::stderr(), "malla-cni: {e}");
    std::process::exit(1)
}
