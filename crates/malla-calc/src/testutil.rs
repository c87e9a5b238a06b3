//! Test helpers: golden files and the `nft -c` check.

use std::path::PathBuf;
use std::process::Command;

/// Compares `got` with the golden file `testdata/<name>` (its content is `want`); with
/// `MALLA_UPDATE_GOLDEN=1` rewrites the file instead.
pub fn golden(name: &str, got: &str, want: &str) {
    if std::env::var_os("MALLA_UPDATE_GOLDEN").is_some() {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name);
        std::fs::write(&p, got).expect("writing golden file");
        return;
    }
    assert_eq!(
        got, want,
        "golden testdata/{name} differs (MALLA_UPDATE_GOLDEN=1 rewrites it)"
    );
}

/// Runs `nft -c -f` (check only, nothing applied) on `text`. Returns `None` when the check
/// cannot run here (no `nft`, not root), else the result.
pub fn nft_check(text: &str) -> Option<Result<(), String>> {
    let euid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&euid.stdout).trim() != "0" {
        eprintln!("skipping nft -c: not root");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("malla-calc-nft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let file = dir.join(format!("check-{}.nft", fnv(text)));
    std::fs::write(&file, text).ok()?;
    let out = match Command::new("nft").arg("-c").arg("-f").arg(&file).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipping nft -c: {e}");
            return None;
        }
    };
    let _ = std::fs::remove_file(&file);
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
