//! Malla's OCI image (issue 17), built here without a registry by `scripts/build-image`: two
//! builds of one commit give the same image; the CNI plugin and the agent are static (no ELF
//! interpreter, so they run on any host's libc); the image loads into a real containerd, where
//! `malla --version`, the plugin's `VERSION` and the bundled `nft`, `conntrack`, `bird` and
//! `birdc` run.
//! Its size is printed for the notes. Needs root, buildah and musl-gcc (`scripts/deps`).

use std::path::{Path, PathBuf};
use std::process::Command;

use malla_test_kit::runtimes::{self, Containerd};
use serde_json::Value;

const TAG: &str = "ghcr.io/malla-net/malla:0.1.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the image into `out` with a fixed timestamp.
fn build(out: &Path) {
    let status = Command::new(repo().join("scripts/build-image"))
        .arg(out)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .env("CARGO_TARGET_DIR", image_target())
        .status()
        .expect("running scripts/build-image");
    assert!(status.success(), "scripts/build-image failed");
}

/// Where the static binaries are built (apart from the tests' own target directory: another
/// target triple, built in release).
fn image_target() -> PathBuf {
    std::env::var_os("MALLA_IMAGE_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/malla-image-target".into())
}

/// The digest of the image manifest an OCI archive's index names.
fn manifest_digest(archive: &Path) -> String {
    let out = Command::new("tar")
        .args(["-xOf"])
        .arg(archive)
        .arg("index.json")
        .output()
        .expect("tar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index: Value = serde_json::from_slice(&out.stdout).expect("index.json");
    index["manifests"][0]["digest"]
        .as_str()
        .expect("a manifest digest")
        .to_string()
}

/// Whether the ELF file at `path` names an interpreter (a `PT_INTERP` program header): a
/// dynamically linked executable does, a static one does not.
fn has_interpreter(path: &Path) -> bool {
    let b = std::fs::read(path).expect("binary");
    assert_eq!(&b[..4], b"\x7fELF", "{}", path.display());
    assert_eq!(b[4], 2, "64-bit");
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let p = phoff + i * phentsize;
        u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) == 3
    })
}

#[test]
fn the_image_is_reproducible_static_and_runs_in_containerd() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root");
        return;
    }
    runtimes::require_tools(&["buildah", "musl-gcc", "ctr", "containerd", "runc"]);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
    build(&a);
    build(&b);
    assert_eq!(
        manifest_digest(&a),
        manifest_digest(&b),
        "two builds of one commit give one image"
    );
    let size = std::fs::metadata(&a).unwrap().len();
    eprintln!(
        "malla image: {:.1} MB (OCI archive, compressed layers)",
        size as f64 / 1e6
    );

    // The binaries the image holds: static.
    let bins = image_target().join("x86_64-unknown-linux-musl/release");
    for bin in ["malla-cni", "malla"] {
        assert!(
            !has_interpreter(&bins.join(bin)),
            "{bin} is dynamically linked"
        );
    }
    assert!(
        has_interpreter(Path::new("/usr/sbin/nft")),
        "the check tells a dynamic binary"
    );

    // Loaded into a containerd of its own, in a namespace of its own.
    let ns = format!("mlt-image-{}", std::process::id());
    malla_dataplane::netns::create(&ns).unwrap();
    let result = std::panic::catch_unwind(|| {
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "none", "plugins": []});
        let ctd = Containerd::start(&ns, &conf, dir.path(), "img");
        let import = ctd.ctr(&["images", "import", a.to_str().unwrap()]);
        assert!(import.ok, "ctr images import: {}", import.text());
        let fifo = ctd.dir().join("fifo");
        let run = |id: &str, extra: &[&str], argv: &[&str]| {
            let extra = [&["--fifo-dir", fifo.to_str().unwrap()][..], extra].concat();
            let mut cmd = ctd.run_image_command(id, false, &extra, TAG, argv);
            runtimes::run(&mut cmd, runtimes::T)
        };
        let v = run("version", &[], &["/usr/local/bin/malla", "--version"]);
        assert!(v.ok && v.stdout.contains("malla"), "{}", v.text());
        let cni = run(
            "cni",
            &["--env", "CNI_COMMAND=VERSION"],
            &["/usr/local/bin/malla-cni"],
        );
        assert!(
            cni.ok && cni.stdout.contains("supportedVersions"),
            "{}",
            cni.text()
        );
        for tool in ["/usr/sbin/nft", "/usr/sbin/conntrack"] {
            let id = tool.rsplit('/').next().unwrap();
            let out = run(id, &[], &[tool, "--version"]);
            assert!(out.ok, "{tool} in the image: {}", out.text());
        }
        // BIRD (`routing: bgp`): its version, and `birdc` runs (its libraries load) and reports
        // that nothing listens on a socket that does not exist.
        let bird = run("bird-version", &[], &["/usr/sbin/bird", "--version"]);
        assert!(bird.text().contains("BIRD version 2"), "{}", bird.text());
        let birdc = run(
            "birdc",
            &[],
            &[
                "/usr/sbin/birdc",
                "-s",
                "/run/malla/bird/none.ctl",
                "show",
                "status",
            ],
        );
        assert!(
            birdc
                .text()
                .contains("Unable to connect to server control socket"),
            "birdc in the image: {}",
            birdc.text()
        );
    });
    malla_dataplane::netns::delete(&ns).unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
