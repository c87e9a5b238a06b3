//! `malla-cni`: the binary a container runtime executes (installed as CNI type `malla`).

use std::io::{Read, Write};

fn main() {
    // Run by hand (outside a runtime): say what this is instead of a CNI error. args_os: an
    // argument that is not UTF-8 must not panic the plugin (args() would).
    if let Some(arg) = std::env::args_os().nth(1) {
        if ["--version", "-V", "version"].iter().any(|v| arg == *v) {
            println!("malla-cni {}", env!("CARGO_PKG_VERSION"));
            return;
        }
    }
    // vars_os: a variable that is not UTF-8 must not panic the plugin (vars() would).
    let env: Vec<_> = std::env::vars_os().collect();
    let mut stdin = Vec::new();
    let version = env
        .iter()
        .any(|(k, v)| k == "CNI_COMMAND" && v == "VERSION");
    if !version {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            emit_error(&malla_cni::CniError::new(
                malla_cni::error::IO_FAILURE,
                "reading stdin",
                e.to_string(),
            ));
        }
    }
    match malla_cni::run_os(env, &stdin) {
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
